"""Packing tokenised documents into fixed-length blocks, and the train/valid split rule.

Two modes, as the reference's ``group_texts`` functions:

``ae`` (``train_autoencoder.py``): each document's ids (as the tokenizer returns
  them, so with Llama-3's BOS first) get EOS appended and are then padded with
  PAD to a multiple of the patch size K; the padded documents are concatenated
  and cut into blocks. Every K-token patch therefore belongs to one document,
  and PAD appears only right after an EOS.

``lm`` (``train_calm.py`` and ``train_ar.py``, which are identical here): the
  reference concatenates the tokenizer outputs *unchanged* -- no EOS, no PAD. With
  Llama-3 the documents are still separated, by the BOS that the tokenizer's
  post-processor puts at the start of each one. A tokenizer without such a
  post-processor (the BPE trained here) would run documents together, so this
  mode appends EOS to each document by default (``append_eos=True``);
  ``append_eos=False`` reproduces the reference exactly.

In both modes the tail that does not fill a block is dropped. The reference drops
a tail per 1000-document ``datasets.map`` batch; here only the final tail of each
split is dropped, which loses less data and does not depend on a batch size.

Split rule: a document goes to the validation split iff the first 8 bytes of its
BLAKE2b digest, read as a fraction of 2**64, fall below ``valid_fraction``. This
is deterministic, independent of document order and of how the corpus is
sharded, and puts exact duplicates on the same side; the realised fraction is
``valid_fraction`` in expectation.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from calm_jax.data.errors import DataError

MODES = ("ae", "lm")


def is_valid_document(doc: str | np.ndarray, valid_fraction: float) -> bool:
  """The split rule above: True when ``doc`` belongs to the validation split."""
  if valid_fraction <= 0.0:
    return False
  data = doc.encode("utf-8") if isinstance(doc, str) else np.ascontiguousarray(doc, "<i4").tobytes()
  digest = hashlib.blake2b(data, digest_size=8).digest()
  return int.from_bytes(digest, "big") < valid_fraction * 2**64


def check_block_shape(block_length: int, patch_size: int) -> None:
  """Raises DataError unless block_length is a positive multiple of patch_size."""
  if patch_size < 1:
    raise DataError(f"patch_size must be >= 1, got {patch_size}")
  if block_length < 1 or block_length % patch_size:
    raise DataError(f"block_length {block_length} is not a positive multiple of patch_size {patch_size}")


@dataclasses.dataclass
class PackStats:
  """Counts for one split; ``tokens`` is what the blocks hold (blocks * block_length)."""

  documents: int = 0
  document_tokens: int = 0  # Ids the tokenizer produced (BOS included when it adds one).
  eos_tokens: int = 0  # Added by packing.
  pad_tokens: int = 0  # Added by packing (ae mode only).
  dropped_tokens: int = 0  # Final tail shorter than a block.
  blocks: int = 0
  tokens: int = 0


class BlockPacker:
  """Streams documents in, full ``[n, block_length]`` int32 blocks out.

  Usage::

    packer = BlockPacker(2048, 4, "ae", eos_id=..., pad_id=...)
    for ids in docs: write(packer.add(ids))
    packer.finish()   # drops the tail, fills in stats.dropped_tokens
  """

  def __init__(self, block_length: int, patch_size: int, mode: str, *, eos_id: int, pad_id: int,
               append_eos: bool = True):
    check_block_shape(block_length, patch_size)
    if mode not in MODES:
      raise DataError(f"packing mode {mode!r} is not one of {MODES}")
    self.block_length, self.patch_size, self.mode = block_length, patch_size, mode
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)
    # ae mode always appends EOS (the reference does); lm mode follows the flag.
    self.append_eos = True if mode == "ae" else bool(append_eos)
    self.stats = PackStats()
    self._pieces: list[np.ndarray] = []
    self._pending = 0

  def _piece(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    extra = [self.eos_id] if self.append_eos else []
    n = ids.size + len(extra)
    pad = (-n) % self.patch_size if self.mode == "ae" else 0
    self.stats.documents += 1
    self.stats.document_tokens += ids.size
    self.stats.eos_tokens += len(extra)
    self.stats.pad_tokens += pad
    if not extra and not pad:
      return ids
    return np.concatenate([ids, np.asarray(extra + [self.pad_id] * pad, dtype=np.int32)])

  def add(self, ids: np.ndarray) -> np.ndarray:
    """Adds one document; returns the blocks it completed, shape ``[n, block_length]`` (n >= 0)."""
    piece = self._piece(ids)
    self._pieces.append(piece)
    self._pending += piece.size
    if self._pending < self.block_length:
      return np.zeros((0, self.block_length), np.int32)
    flat = np.concatenate(self._pieces)
    n = flat.size // self.block_length
    cut = n * self.block_length
    rest = flat[cut:]
    self._pieces, self._pending = ([rest] if rest.size else []), rest.size
    self.stats.blocks += n
    self.stats.tokens += cut
    return flat[:cut].reshape(n, self.block_length)

  def finish(self) -> PackStats:
    """Drops the incomplete tail and returns the final counts."""
    self.stats.dropped_tokens += self._pending
    self._pieces, self._pending = [], 0
    return self.stats
