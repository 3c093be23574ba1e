"""Document sources: where the raw corpus comes from.

A *source* yields documents, each either a ``str`` (text, to be tokenised) or a
1-D ``int32`` array (already tokenised). A *source spec* names one source:

  ``text:<glob>[;doc=file|paragraph|line]``
      Plain UTF-8 text files. ``doc=file`` (default) makes each file one
      document; ``paragraph`` splits on blank lines; ``line`` on newlines.
  ``jsonl:<glob>[;field=text][;max_words=N]``
      JSON lines, one object per line with a text field: the Pile shard layout
      ``{"text": ..., "meta": ...}`` and the reference's document-level WikiText
      file ``data/wikitext_document_level-test.json`` (JSON lines despite its
      extension; a file holding one JSON array of objects is accepted too).
      ``.gz`` files are read through gzip. ``max_words=N`` splits documents of
      more than N space-separated words into pieces of N words, as the
      reference's ``data/process.py`` does with N = 10000 for the Pile.
  ``tfds:<name>[;split=train][;data_dir=DIR][;field=text]``
      A TFDS dataset read through ``tfds.data_source`` (ArrayRecord format, no
      TensorFlow needed); it is never downloaded here.
  ``tokens:<glob>``
      ArrayRecord shards whose records are little-endian int32 token ids, one
      document per record (pre-tokenised; used without a tokenizer pass).
  ``default[:train|valid]``
      The embedded stdlib-docstring corpus (see ``corpus.py``).

Without a ``kind:`` prefix the kind is inferred from the file extension
(``.txt .text .md`` -> text, ``.jsonl .json .jsonl.gz .json.gz`` -> jsonl,
``.array_record .arrayrecord`` -> tokens). Options are separated by ``;``
because ``?`` and ``,`` are glob or filename characters.

Every problem with the input raises :class:`DataError` with a one-line message
naming the file (and the line for JSON lines).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from calm_jax.data.errors import DataError

Document = str | np.ndarray

KINDS = ("text", "jsonl", "tfds", "tokens", "default")
_OPTIONS = {
    "text": {"doc"},
    "jsonl": {"field", "max_words"},
    "tfds": {"split", "data_dir", "field"},
    "tokens": set(),
    "default": set(),
}
_EXTENSIONS = (
    (".jsonl.gz", "jsonl"), (".json.gz", "jsonl"), (".jsonl", "jsonl"), (".json", "jsonl"),
    (".txt", "text"), (".text", "text"), (".md", "text"),
    (".array_record", "tokens"), (".arrayrecord", "tokens"),
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source: its kind, a location (glob, TFDS name or default split) and options."""

  kind: str
  location: str
  options: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    opts = "".join(f";{k}={v}" for k, v in sorted(self.options.items()))
    return f"{self.kind}:{self.location}{opts}"


def parse_spec(spec: str | SourceSpec) -> SourceSpec:
  """Parses a spec string (see the module docstring); validates kind and options."""
  if isinstance(spec, SourceSpec):
    parsed = spec
  else:
    if not isinstance(spec, str) or not spec.strip():
      raise DataError(f"empty or non-string source spec: {spec!r}")
    head, *opt_items = spec.strip().split(";")
    match = re.match(r"^([a-z]+):(.*)$", head)
    if match and match.group(1) in KINDS:
      kind, location = match.group(1), match.group(2)
    elif head in ("default",):
      kind, location = "default", ""
    else:
      kind, location = _kind_from_extension(head), head
    options = {}
    for item in opt_items:
      if "=" not in item:
        raise DataError(f"source spec {spec!r}: option {item!r} is not key=value")
      key, value = item.split("=", 1)
      options[key.strip()] = value.strip()
    parsed = SourceSpec(kind, location, options)
  unknown = set(parsed.options) - _OPTIONS[parsed.kind]
  if unknown:
    raise DataError(f"source spec {parsed}: unknown option(s) {sorted(unknown)} for kind "
                    f"{parsed.kind!r} (allowed: {sorted(_OPTIONS[parsed.kind])})")
  return parsed


def _kind_from_extension(path: str) -> str:
  for ext, kind in _EXTENSIONS:
    if path.lower().endswith(ext):
      return kind
  raise DataError(f"cannot infer the source kind of {path!r}; prefix it with one of "
                  f"{', '.join(k + ':' for k in KINDS)}")


def expand_glob(pattern: str) -> list[str]:
  """Sorted files matching ``pattern`` (a plain path or a glob); never empty."""
  pattern = os.path.expanduser(pattern)
  if glob.has_magic(pattern):
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      raise DataError(f"glob {pattern} matches no files")
    return paths
  if not os.path.isfile(pattern):
    raise DataError(f"{pattern}: no such file")
  return [pattern]


class Source:
  """A finite, deterministic stream of documents with a one-line description.

  Attributes:
    description: what the source is, recorded in the manifest.
    num_documents: the count when known up front (for progress bars), else None.
  """

  description: str = ""
  num_documents: int | None = None

  def documents(self) -> Iterator[Document]:
    raise NotImplementedError


class TextFileSource(Source):
  """Plain text files; one document per file, paragraph or line."""

  def __init__(self, paths: Sequence[str], doc: str = "file", description: str = ""):
    if doc not in ("file", "paragraph", "line"):
      raise DataError(f"text source {description}: doc={doc!r} is not file|paragraph|line")
    self.paths, self.doc = list(paths), doc
    self.description = description or f"text:{len(self.paths)} files"

  def documents(self) -> Iterator[str]:
    for path in self.paths:
      try:
        with open(path, encoding="utf-8") as f:
          text = f.read()
      except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
      except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
      if self.doc == "file":
        if text.strip():
          yield text
      elif self.doc == "paragraph":
        for para in re.split(r"\n\s*\n", text):
          if para.strip():
            yield para.strip("\n")
      else:
        for line in text.splitlines():
          if line.strip():
            yield line


class JsonLinesSource(Source):
  """JSON lines (or one JSON array) of objects with a text field."""

  def __init__(self, paths: Sequence[str], field: str = "text", max_words: int = 0,
               description: str = ""):
    self.paths, self.field, self.max_words = list(paths), field, int(max_words)
    self.description = description or f"jsonl:{len(self.paths)} files"

  def _records(self, path: str) -> Iterator[tuple[int, object]]:
    """Yields (line number, parsed object); line 0 for whole-file JSON arrays."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
      with opener(path, "rt", encoding="utf-8") as f:
        first, skipped_lines = f.read(1), 0
        while first and first.isspace():
          skipped_lines += first == "\n"
          first = f.read(1)
        if first == "[":  # A single JSON array rather than JSON lines.
          try:
            records = json.loads(first + f.read())
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
          for record in records:
            yield 0, record
          return
        for lineno, line in enumerate(_prepend(first, f), start=1 + skipped_lines):
          if not line.strip():
            continue
          try:
            yield lineno, json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None

  def documents(self) -> Iterator[str]:
    for path in self.paths:
      for lineno, record in self._records(path):
        where = f"{path}:{lineno}" if lineno else path
        if not isinstance(record, dict) or self.field not in record:
          raise DataError(f"{where}: record has no {self.field!r} field")
        text = record[self.field]
        if not isinstance(text, str):
          raise DataError(f"{where}: field {self.field!r} is {type(text).__name__}, not a string")
        yield from _split_words(text, self.max_words)


def _prepend(first: str, f: io.TextIOBase) -> Iterator[str]:
  """Lines of ``f`` with ``first`` (already consumed) put back in front."""
  lines = iter(f)
  try:
    yield first + next(lines)
  except StopIteration:
    if first:
      yield first
    return
  yield from lines


def _split_words(text: str, max_words: int) -> Iterator[str]:
  """The reference's ``process.py``: split on ' ' into pieces of max_words words."""
  if max_words <= 0:
    yield text
    return
  words = text.split(" ")
  while len(words) > max_words:
    yield " ".join(words[:max_words])
    words = words[max_words:]
  yield " ".join(words)


class TfdsSource(Source):
  """A prepared TFDS dataset read with ``tfds.data_source`` (random access, no TF)."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               field: str = "text", description: str = ""):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise DataError(f"tfds:{name}: tensorflow_datasets is not installed ({e})") from None
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                      try_gcs=False)
    except Exception as e:  # noqa: BLE001  TFDS raises assorted types for a missing dataset.
      where = f"{data_dir}/{name}" if data_dir else name
      raise DataError(f"tfds:{where} split {split}: cannot open ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    self.field = field
    self.num_documents = len(self._source)
    self.description = description or f"tfds:{name};split={split}"

  def documents(self) -> Iterator[str]:
    for i in range(self.num_documents):
      record = self._source[i]
      if self.field not in record:
        raise DataError(f"{self.description}: record {i} has no {self.field!r} field")
      text = record[self.field]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


class TokenShardSource(Source):
  """Pre-tokenised ArrayRecord shards: each record is one document of int32 ids."""

  def __init__(self, paths: Sequence[str], description: str = ""):
    from array_record.python import array_record_data_source  # pylint: disable=import-outside-toplevel
    self.paths = list(paths)
    try:
      self._source = array_record_data_source.ArrayRecordDataSource(self.paths)
    except Exception as e:  # noqa: BLE001  The C++ reader raises RuntimeError/ValueError variously.
      raise DataError(f"{self.paths[0]}{' ...' if len(self.paths) > 1 else ''}: "
                      f"not readable as ArrayRecord ({str(e).splitlines()[0]})") from None
    self.num_documents = len(self._source)
    self.description = description or f"tokens:{len(self.paths)} files"

  def documents(self) -> Iterator[np.ndarray]:
    for i in range(self.num_documents):
      record = self._source[i]
      if len(record) % 4:
        raise DataError(f"{self.description}: record {i} has {len(record)} bytes, not a "
                        "multiple of 4 (int32 token ids)")
      yield np.frombuffer(record, dtype="<i4").astype(np.int32)


class ListSource(Source):
  """In-memory documents (used by tests and by the default corpus)."""

  def __init__(self, docs: Sequence[Document], description: str = "list"):
    self.docs, self.description, self.num_documents = docs, description, len(docs)

  def documents(self) -> Iterator[Document]:
    yield from self.docs


class ChainSource(Source):
  """Several sources read one after another."""

  def __init__(self, sources: Sequence[Source]):
    self.sources = list(sources)
    self.description = " + ".join(s.description for s in self.sources)
    counts = [s.num_documents for s in self.sources]
    self.num_documents = None if None in counts else sum(counts)

  def documents(self) -> Iterator[Document]:
    for s in self.sources:
      yield from s.documents()


def open_source(spec: str | SourceSpec | Source | Sequence) -> Source:
  """Opens a source from a spec, a list of specs, or passes a Source through.

  Fails early (on open, not on first read) when files are missing or globs empty.
  """
  if isinstance(spec, Source):
    return spec
  if isinstance(spec, (list, tuple)):
    if not spec:
      raise DataError("empty list of source specs")
    sources = [open_source(s) for s in spec]
    return sources[0] if len(sources) == 1 else ChainSource(sources)
  parsed = parse_spec(spec)
  desc, opts = str(parsed), parsed.options
  if parsed.kind == "text":
    return TextFileSource(expand_glob(parsed.location), doc=opts.get("doc", "file"), description=desc)
  if parsed.kind == "jsonl":
    try:
      max_words = int(opts.get("max_words", 0))
    except ValueError:
      raise DataError(f"source spec {desc}: max_words must be an integer") from None
    return JsonLinesSource(expand_glob(parsed.location), field=opts.get("field", "text"),
                           max_words=max_words, description=desc)
  if parsed.kind == "tfds":
    if not parsed.location:
      raise DataError(f"source spec {desc}: missing dataset name")
    return TfdsSource(parsed.location, split=opts.get("split", "train"),
                      data_dir=opts.get("data_dir"), field=opts.get("field", "text"),
                      description=desc)
  if parsed.kind == "tokens":
    return TokenShardSource(expand_glob(parsed.location), description=desc)
  # kind == "default": the embedded corpus, imported lazily (it scans the stdlib).
  from calm_jax.data import corpus  # pylint: disable=import-outside-toplevel
  split = parsed.location or "train"
  if split not in ("train", "valid"):
    raise DataError(f"source spec {desc}: the default corpus has splits train|valid, not {split!r}")
  train_docs, valid_docs = corpus.default_corpus()
  return ListSource(train_docs if split == "train" else valid_docs,
                    description=f"default:{split} ({corpus.describe()})")
