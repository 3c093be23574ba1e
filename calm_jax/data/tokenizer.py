"""Tokenizers: load a ``tokenizer.json`` or train a byte-level BPE, with a PAD id.

The reference (``train_autoencoder.py``, ``train_calm.py``) loads the Llama-3
tokenizer with ``AutoTokenizer`` and, because it has no pad token, adds
``[PAD]`` as a special token: ``vocab_size = len(tokenizer) = 128257`` and the
pad id is the last id, 128256. :func:`load_tokenizer` does the same with the
``tokenizers`` library alone (no transformers). Which token is EOS (and BOS) is
not part of ``tokenizer.json``; it is read from the Hugging Face side files
(``tokenizer_config.json``, ``special_tokens_map.json``) next to it, or from
the ``eos_token`` argument, or from a short list of conventional names.

Encoding applies the tokenizer's own post-processor, as ``AutoTokenizer``'s
``tokenizer(texts)`` does: for Llama-3 every document starts with
``<|begin_of_text|>``; a BPE trained here adds nothing.

The fingerprint is the sha256 of the tokenizer's JSON serialisation after PAD is
added; a prepared data set records it so a run can refuse mismatched data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from calm_jax.data.errors import DataError

DEFAULT_PAD_TOKEN = "[PAD]"  # As the reference's DEFAULT_PAD_TOKEN.
BPE_EOS_TOKEN = "<|endoftext|>"
# Tried in order when no side file names the EOS token.
_CONVENTIONAL_EOS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]")
_SIDE_FILES = ("special_tokens_map.json", "tokenizer_config.json")


class TextTokenizer:
  """A ``tokenizers.Tokenizer`` with the ids training needs.

  Attributes:
    vocab_size: number of ids including added tokens (HF ``len(tokenizer)``).
    pad_id: id of the PAD token (the last id when PAD had to be added).
    eos_id: id of the end-of-document token.
    bos_id: id of the beginning-of-document token, or None.
    fingerprint: sha256 hex digest of :meth:`to_json`.
  """

  def __init__(self, tok: tokenizers.Tokenizer, eos_token: str, pad_token: str = DEFAULT_PAD_TOKEN,
               bos_token: str | None = None, name: str = ""):
    self._tok = tok
    self.name = name
    self.eos_token, self.bos_token = eos_token, bos_token
    self.eos_id = tok.token_to_id(eos_token)
    if self.eos_id is None:
      raise DataError(f"tokenizer {name or '<in memory>'}: EOS token {eos_token!r} is not in its vocabulary")
    self.bos_id = tok.token_to_id(bos_token) if bos_token else None
    if tok.token_to_id(pad_token) is None:
      # As the reference: add PAD as a special token; it takes the next free id.
      tok.add_special_tokens([tokenizers.AddedToken(pad_token, special=True, normalized=False)])
    self.pad_token = pad_token
    self.pad_id = tok.token_to_id(pad_token)
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if max(self.pad_id, self.eos_id) >= self.vocab_size:
      raise DataError(f"tokenizer {name}: special ids exceed the vocabulary size {self.vocab_size}")
    self.fingerprint = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying ``tokenizers.Tokenizer``."""
    return self._tok

  def to_json(self) -> str:
    """The canonical JSON serialisation (the fingerprint's input)."""
    return self._tok.to_str()

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[np.ndarray]:
    """Token ids (int32 arrays) for each text; special tokens as the post-processor adds them."""
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
    return self.encode_batch([text], add_special_tokens)[0]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def special_tokens_map(self) -> dict[str, str]:
    tokens = {"eos_token": self.eos_token, "pad_token": self.pad_token}
    if self.bos_token:
      tokens["bos_token"] = self.bos_token
    return tokens

  def save(self, directory: str) -> str:
    """Writes ``tokenizer.json`` and ``special_tokens_map.json``; returns the json path.

    ``load_tokenizer`` on the result gives back a tokenizer with the same fingerprint.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.to_json())
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(self.special_tokens_map(), f, indent=2, sort_keys=True)
    return path

  def __repr__(self) -> str:
    return (f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"eos_id={self.eos_id}, bos_id={self.bos_id}, fingerprint={self.fingerprint[:12]})")


def _token_content(value) -> str | None:
  """HF side files store a token as a string or as an AddedToken dict."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _side_file_tokens(directory: str) -> dict[str, str]:
  found: dict[str, str] = {}
  for name in _SIDE_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    for key in ("eos_token", "bos_token", "pad_token"):
      content = _token_content(data.get(key))
      if content and key not in found:
        found[key] = content
  return found


def load_tokenizer(path_or_none: str | None, *, eos_token: str | None = None,
                   bos_token: str | None = None, pad_token: str | None = None,
                   vocab_size: int = 8192) -> TextTokenizer:
  """Loads a tokenizer, adding a PAD token when it has none.

  Args:
    path_or_none: a ``tokenizer.json`` file, a directory holding one, or None for
      the default: a byte-level BPE of ``vocab_size`` trained on the embedded
      default corpus (cached; see ``corpus.py``).
    eos_token, bos_token, pad_token: override what the side files say. Without a
      pad token anywhere, ``[PAD]`` is added as the last id (the reference's rule).
    vocab_size: only for the default tokenizer.

  Raises:
    DataError: the file is missing or unreadable, or no EOS token can be found.
  """
  if path_or_none is None:
    from calm_jax.data import corpus  # pylint: disable=import-outside-toplevel
    return corpus.default_tokenizer(vocab_size)
  path = os.path.expanduser(str(path_or_none))
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such tokenizer file")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # noqa: BLE001  tokenizers raises a bare Exception for bad files.
    raise DataError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
  side = _side_file_tokens(os.path.dirname(path))
  eos = eos_token or side.get("eos_token")
  if eos is None:
    eos = next((t for t in _CONVENTIONAL_EOS if tok.token_to_id(t) is not None), None)
  if eos is None:
    raise DataError(f"{path}: cannot tell which token is EOS (no special_tokens_map.json or "
                    "tokenizer_config.json beside it, no conventional name); pass eos_token=")
  return TextTokenizer(tok, eos_token=eos, pad_token=pad_token or side.get("pad_token") or DEFAULT_PAD_TOKEN,
                       bos_token=bos_token or side.get("bos_token"), name=path)


def train_bpe_tokenizer(docs: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                        eos_token: str = BPE_EOS_TOKEN, pad_token: str = DEFAULT_PAD_TOKEN,
                        name: str = "bpe") -> TextTokenizer:
  """Trains a GPT-2-style byte-level BPE; deterministic for the same docs in the same order.

  The result has exactly ``vocab_size`` ids: EOS is id 0, the 256 byte symbols
  follow, then merges, and PAD is the last id (``vocab_size - 1``), matching the
  reference's layout of PAD after everything else. No BOS is added to documents.

  Args:
    docs: training texts (consumed once).
    vocab_size: total vocabulary including EOS and PAD; at least 258 + 1.
    min_frequency: a merge needs a pair seen at least this often.
  """
  base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # Bytes + EOS.
  if vocab_size <= base:
    raise DataError(f"BPE vocab_size {vocab_size} must exceed {base} (256 bytes + EOS + PAD)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - 1,  # PAD is added afterwards as the last id.
      min_frequency=min_frequency,
      special_tokens=[eos_token],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(docs, trainer)
  got = tok.get_vocab_size(with_added_tokens=True)
  if got != vocab_size - 1:
    # The corpus ran out of pairs seen min_frequency times before reaching the size.
    raise DataError(f"BPE training reached only {got + 1} of vocab_size {vocab_size} "
                    f"(corpus too small for min_frequency={min_frequency})")
  return TextTokenizer(tok, eos_token=eos_token, pad_token=pad_token, name=name)
