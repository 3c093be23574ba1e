"""The embedded default corpus: English prose from the Python standard library.

Every CPython installation carries several megabytes of human-written English in
its standard library: module, class and function docstrings, block comments, and
the ``pydoc_data.topics`` reference pages. :func:`default_corpus` collects them
into documents so that smoke runs, tests and tutorials need no download and
nothing is copied into this repository.

Construction (fixed, so the corpus depends only on the Python installation):
  * every ``*.py`` under ``sysconfig.get_paths()['stdlib']`` in sorted path
    order, skipping ``site-packages``, ``dist-packages``, ``__pycache__`` and
    hidden directories (test packages are kept: their docstrings and comments
    are prose too);
  * from each file, in source order, every triple-quoted string (dedented with
    ``inspect.cleandoc``) and every block of consecutive ``#`` comment lines;
    doctest lines (``>>>``, ``...``) are removed;
  * a chunk is kept if it looks like prose: at least 40 characters and 6 words,
    at least 85% letters/whitespace/ordinary punctuation, and at least 8% of its
    words in a short list of English function words; exact repeats of an earlier
    chunk are dropped;
  * one document per file (its kept chunks joined by blank lines) and one per
    ``pydoc_data.topics`` entry of at least 200 characters (topics sorted by name).

A document goes to the validation split when its name (``stdlib/<relative
path>`` or ``pydoc/<topic>``) passes the split rule of ``packing.py`` with
fraction 0.05. On CPython 3.11 this gives about 5 MB of text.

The built corpus is cached as JSON lines under ``$CALM_JAX_CACHE`` (default
``$XDG_CACHE_HOME/calm_jax``, i.e. ``~/.cache/calm_jax``) in a directory keyed by
the builder version and the Python implementation and version; it is written to
a temporary directory and renamed, so concurrent builders cannot leave a torn copy.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import re
import sys
import sysconfig
import tempfile

from calm_jax.data.errors import DataError
from calm_jax.data.packing import is_valid_document

BUILDER_VERSION = 1  # Bump when the construction above changes.
VALID_FRACTION = 0.05
MIN_CHARS, MIN_WORDS, MIN_PROSE_CHARS, MIN_FUNCTION_WORDS = 40, 6, 0.85, 0.08
MIN_TOPIC_CHARS = 200
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_FUNCTION_WORDS = frozenset((
    "the", "of", "and", "to", "a", "is", "in", "that", "it", "for", "this", "be", "are", "as", "with",
    "by", "on", "not", "or", "if", "an", "from", "at", "which"))
# Triple-quoted strings and blocks of comment lines, in one left-to-right scan so
# that a '#' inside a docstring is never taken for a comment (and vice versa). The
# lookahead lets the regex engine skip quickly to candidate positions.
_CHUNK_RE = re.compile(r'(?=["\'#])(?:(?P<q>"""|\'\'\')(?P<s>.*?)(?P=q)|(?P<c>#[^\n]*(?:\n[ \t]*#[^\n]*)*))',
                       re.DOTALL)
# Characters that are neither letters nor ordinary prose punctuation/whitespace.
_NON_PROSE_RE = re.compile(r"[^\w \n\t.,;:'\"()?!-]|[\d_]")
_COMMENT_PREFIX_RE = re.compile(r"^[ \t]*#+ ?", re.MULTILINE)
_DOCTEST_RE = re.compile(r"^[ \t]*(?:>>>|\.\.\.)(?: .*)?$\n?", re.MULTILINE)


def cache_dir() -> str:
  """Where calm_jax caches built artefacts (``$CALM_JAX_CACHE`` wins)."""
  if os.environ.get("CALM_JAX_CACHE"):
    return os.path.expanduser(os.environ["CALM_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "calm_jax")


def corpus_key() -> str:
  """Names the cached build: builder version + Python implementation and version."""
  return f"v{BUILDER_VERSION}-{platform.python_implementation().lower()}-{platform.python_version()}"


def _is_prose(text: str) -> bool:
  if len(text) < MIN_CHARS:
    return False
  words = text.split()
  if len(words) < MIN_WORDS:
    return False
  if len(_NON_PROSE_RE.findall(text)) > (1.0 - MIN_PROSE_CHARS) * len(text):
    return False
  return sum(w in _FUNCTION_WORDS for w in text.lower().split()) >= MIN_FUNCTION_WORDS * len(words)


def _chunks(source: str) -> list[str]:
  """Candidate prose chunks of one Python file, in source order."""
  out = []
  for m in _CHUNK_RE.finditer(source):
    if m.group("s") is not None:
      if len(m.group("s")) < MIN_CHARS:
        continue
      text = inspect.cleandoc(m.group("s"))
    else:
      text = m.group("c")
      line_start = source.rfind("\n", 0, m.start()) + 1
      if source[line_start:m.start()].strip():
        # An inline comment after code: keep only the full comment lines below it.
        text = text.partition("\n")[2]
      text = _COMMENT_PREFIX_RE.sub("", text)
    text = _DOCTEST_RE.sub("", text).strip()
    if text:
      out.append(text)
  return out


def _stdlib_files(root: str) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return files


def build_documents(max_files: int | None = None) -> list[tuple[str, str]]:
  """(name, text) documents in their fixed order; ``max_files`` truncates (for tests)."""
  root = sysconfig.get_paths()["stdlib"]
  if not os.path.isdir(root):
    raise DataError(f"{root}: the Python standard library directory does not exist")
  seen: set[str] = set()
  docs = []
  for path in _stdlib_files(root)[:max_files]:
    with open(path, "rb") as f:
      # A few test files are deliberately not UTF-8; 'replace' keeps this deterministic.
      source = f.read().decode("utf-8", errors="replace")
    kept = []
    for chunk in _chunks(source):
      if chunk not in seen and _is_prose(chunk):
        seen.add(chunk)
        kept.append(chunk)
    if kept:
      name = "stdlib/" + path[len(root):].lstrip(os.sep).replace(os.sep, "/")
      docs.append((name, "\n\n".join(kept)))
  if max_files is None:
    try:
      from pydoc_data import topics  # pylint: disable=import-outside-toplevel
    except ImportError:  # Some distributions strip pydoc_data; the stdlib part remains.
      topics = None
    if topics is not None:
      for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if len(text) >= MIN_TOPIC_CHARS:
          docs.append((f"pydoc/{name}", text))
  return docs


def split_documents(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
  """(train_texts, valid_texts) by the split rule applied to document names."""
  train, valid = [], []
  for name, text in docs:
    (valid if is_valid_document(name, VALID_FRACTION) else train).append(text)
  return train, valid


def _write_jsonl(path: str, texts: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def _read_jsonl(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f]


def default_corpus_files() -> tuple[str, str]:
  """Paths of the cached ``train.jsonl`` and ``valid.jsonl`` (``{"text": ...}`` lines), built if absent."""
  target = os.path.join(cache_dir(), "default_corpus", corpus_key())
  train_path, valid_path = os.path.join(target, "train.jsonl"), os.path.join(target, "valid.jsonl")
  if os.path.isfile(os.path.join(target, "meta.json")):
    return train_path, valid_path
  train, valid = split_documents(build_documents())
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(target))
  _write_jsonl(os.path.join(tmp, "train.jsonl"), train)
  _write_jsonl(os.path.join(tmp, "valid.jsonl"), valid)
  digest = hashlib.sha256("\x00".join(train + ["\x01"] + valid).encode("utf-8")).hexdigest()
  meta = {"key": corpus_key(), "python": sys.version, "train_documents": len(train),
          "valid_documents": len(valid), "train_chars": sum(map(len, train)),
          "valid_chars": sum(map(len, valid)), "sha256": digest}
  with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  try:
    os.replace(tmp, target)
  except OSError:  # Another process finished first; its copy is identical.
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(tmp, ignore_errors=True)
  return train_path, valid_path


@functools.lru_cache(maxsize=1)
def _cached_corpus() -> tuple[tuple[str, ...], tuple[str, ...]]:
  train_path, valid_path = default_corpus_files()
  return tuple(_read_jsonl(train_path)), tuple(_read_jsonl(valid_path))


def default_corpus() -> tuple[list[str], list[str]]:
  """(train_docs, valid_docs) of the embedded corpus; built once per machine and Python.

  The first call on a machine builds and caches it (about 5-10 s); later calls
  read the cache, and calls within a process share one in-memory copy.
  """
  train, valid = _cached_corpus()
  return list(train), list(valid)


def describe() -> str:
  train, valid = default_corpus()
  chars = sum(map(len, train)) + sum(map(len, valid))
  return (f"Python {platform.python_version()} stdlib prose, {len(train)}+{len(valid)} docs, "
          f"{chars / 1e6:.1f}M chars")


@functools.lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int = 8192):
  """A byte-level BPE of ``vocab_size`` trained on the default corpus's train split; cached on disk."""
  from calm_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  train_path, _ = default_corpus_files()
  with open(os.path.join(os.path.dirname(train_path), "meta.json"), encoding="utf-8") as f:
    corpus_sha = json.load(f)["sha256"]
  target = os.path.join(cache_dir(), "tokenizers", f"bpe{vocab_size}-{corpus_sha[:16]}")
  if os.path.isfile(os.path.join(target, "tokenizer.json")):
    return tok_lib.load_tokenizer(target)
  tok = tok_lib.train_bpe_tokenizer(default_corpus()[0], vocab_size, name=f"default-bpe{vocab_size}")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(target))
  tok.save(tmp)
  try:
    os.replace(tmp, target)
  except OSError:
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(tmp, ignore_errors=True)
  return tok_lib.load_tokenizer(target)
