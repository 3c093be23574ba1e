"""Tokenise a corpus once into ArrayRecord shards of fixed-length blocks, plus a manifest.

Layout of a prepared directory::

  out_dir/
    manifest.json                  written last: its presence means "complete"
    tokenizer.json                 the tokenizer used (PAD included)
    special_tokens_map.json        which tokens are EOS / BOS / PAD
    train-00000.array_record ...   one record = one block, block_length little-endian int32
    valid-00000.array_record ...

Run it on one process (it reads the whole corpus); training processes then read
disjoint slices of the shards (``pipeline.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tqdm

from calm_jax.data import packing
from calm_jax.data import sources as sources_lib
from calm_jax.data.errors import DataError
from calm_jax.data.tokenizer import TextTokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "calm_jax.blocks.v1"
SPLITS = ("train", "valid")
TOKEN_DTYPE = "<i4"
# Fields check_manifest can compare, and where they live in the manifest.
CHECKABLE = ("block_length", "patch_size", "vocab_size", "tokenizer_fingerprint", "pad_id",
             "eos_id", "mode", "format")


class _ShardWriter:
  """Writes blocks to ``{split}-{i:05d}.array_record``, starting a new file every N blocks."""

  def __init__(self, out_dir: str, split: str, blocks_per_shard: int):
    self.out_dir, self.split, self.blocks_per_shard = out_dir, split, blocks_per_shard
    self.shards: list[dict[str, Any]] = []
    self._writer = None

  def write(self, blocks_NxT: np.ndarray) -> None:
    # Imported here so that reading manifests does not load the C++ extension.
    from array_record.python.array_record_module import ArrayRecordWriter
    for block in blocks_NxT:
      if self._writer is None or self.shards[-1]["blocks"] == self.blocks_per_shard:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.array_record"
        # group_size:1 makes every record individually seekable: shuffled random
        # access then reads one block, not a group of them.
        self._writer = ArrayRecordWriter(os.path.join(self.out_dir, name), "group_size:1")
        self.shards.append({"file": name, "blocks": 0})
      self._writer.write(np.ascontiguousarray(block, dtype=TOKEN_DTYPE).tobytes())
      self.shards[-1]["blocks"] += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _batched(it: Iterator, n: int) -> Iterator[list]:
  batch = []
  for x in it:
    batch.append(x)
    if len(batch) == n:
      yield batch
      batch = []
  if batch:
    yield batch


def prepare(source_spec, out_dir: str, tokenizer: TextTokenizer | str | None, block_length: int,
            patch_size: int, mode: str, valid_fraction: float = 0.0, *,
            valid_source_spec=None, append_eos: bool = True, blocks_per_shard: int = 16384,
            encode_batch_size: int = 256, max_documents: int | None = None,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
  """Tokenises and packs a corpus into ``out_dir``; returns the manifest written there.

  Args:
    source_spec: a spec string, a list of them, or a ``sources.Source`` (see ``sources.py``).
    out_dir: output directory; must not hold a prepared set unless ``overwrite``.
    tokenizer: a ``TextTokenizer``, a tokenizer.json path, or None for the default BPE.
    block_length: tokens per block T; a multiple of ``patch_size``.
    patch_size: the autoencoder's K.
    mode: ``"ae"`` or ``"lm"`` (see ``packing.py`` for what each joins).
    valid_fraction: fraction of documents held out by the hash rule in ``packing.py``;
      ignored when ``valid_source_spec`` is given.
    valid_source_spec: an explicit validation source (e.g. the reference's
      WikiText-103 document-level JSON); then every document of ``source_spec`` trains.
    append_eos: lm mode only; False reproduces the reference's plain concatenation.
    blocks_per_shard: blocks per ArrayRecord file.
    encode_batch_size: documents per ``encode_batch`` call.
    max_documents: stop after this many documents of ``source_spec`` (for smoke runs).
    overwrite: replace an existing prepared directory.
    progress: show a tqdm bar (on a terminal only: none in logs and pipes).

  Returns:
    The manifest dict (also written as ``out_dir/manifest.json``).

  Raises:
    DataError: bad block shape or mode, unreadable input, or an existing output.
  """
  packing.check_block_shape(block_length, patch_size)
  if mode not in packing.MODES:
    raise DataError(f"packing mode {mode!r} is not one of {packing.MODES}")
  if not 0.0 <= valid_fraction < 1.0:
    raise DataError(f"valid_fraction {valid_fraction} is not in [0, 1)")
  source = sources_lib.open_source(source_spec)
  valid_source = sources_lib.open_source(valid_source_spec) if valid_source_spec is not None else None
  if not isinstance(tokenizer, TextTokenizer):
    tokenizer = load_tokenizer(tokenizer)

  if os.path.exists(os.path.join(out_dir, MANIFEST)) and not overwrite:
    raise DataError(f"{out_dir}: already holds a prepared data set (pass overwrite=True)")
  check_out_dir(out_dir)
  # Build in a sibling temp dir and rename at the end, so a crash never leaves a
  # directory that looks complete.
  tmp_dir = out_dir.rstrip("/") + ".incomplete"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  tokenizer.save(tmp_dir)

  def new_packer():
    return packing.BlockPacker(block_length, patch_size, mode, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, append_eos=append_eos)

  packers = {s: new_packer() for s in SPLITS}
  writers = {s: _ShardWriter(tmp_dir, s, blocks_per_shard) for s in SPLITS}

  def consume(src: sources_lib.Source, docs: Iterator, split_of, total: int | None, desc: str) -> None:
    with tqdm.tqdm(total=total, desc=desc, unit=" docs", disable=None if progress else True,
                   dynamic_ncols=True) as bar:
      for batch in _batched(docs, encode_batch_size):
        texts = [(i, d) for i, d in enumerate(batch) if isinstance(d, str)]
        ids = list(batch)
        if texts:
          for (i, _), enc in zip(texts, tokenizer.encode_batch([d for _, d in texts])):
            ids[i] = enc
        for doc, doc_ids in zip(batch, ids):
          if not isinstance(doc, str) and doc.size and not 0 <= doc.min() <= doc.max() < tokenizer.vocab_size:
            raise DataError(f"{src.description}: a pre-tokenised document has ids in [{doc.min()}, "
                            f"{doc.max()}], outside the vocabulary [0, {tokenizer.vocab_size})")
          split = split_of(doc)
          writers[split].write(packers[split].add(doc_ids))
        bar.update(len(batch))

  try:
    docs = source.documents()
    total = source.num_documents
    if max_documents is not None:
      docs = (d for _, d in zip(range(max_documents), docs))
      total = max_documents if total is None else min(total, max_documents)
    if valid_source is None:
      consume(source, docs, lambda d: "valid" if packing.is_valid_document(d, valid_fraction) else "train",
              total, "train+valid")
    else:
      consume(source, docs, lambda d: "train", total, "train")
      consume(valid_source, valid_source.documents(), lambda d: "valid", valid_source.num_documents, "valid")
  except BaseException:
    for w in writers.values():
      w.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)  # Leave nothing half-written behind.
    raise
  for w in writers.values():
    w.close()
  stats = {s: packers[s].finish() for s in SPLITS}
  if not stats["train"].blocks:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    t = stats["train"]
    raise DataError(f"{source.description}: gives no training block ({t.documents} documents, "
                    f"{t.document_tokens} tokens; a block holds {block_length}): nothing written")

  manifest = {
      "format": FORMAT,
      "mode": mode,
      "append_eos": packers["train"].append_eos,
      "block_length": block_length,
      "patch_size": patch_size,
      "token_dtype": "int32",
      "vocab_size": tokenizer.vocab_size,
      "pad_id": tokenizer.pad_id,
      "eos_id": tokenizer.eos_id,
      "bos_id": tokenizer.bos_id,
      "tokenizer_fingerprint": tokenizer.fingerprint,
      "tokenizer_name": tokenizer.name,
      "source": source.description,
      "valid_source": valid_source.description if valid_source else None,
      "valid_fraction": None if valid_source else valid_fraction,
      "split_rule": "explicit valid source" if valid_source else "blake2b-8(doc) / 2**64 < valid_fraction",
      "max_documents": max_documents,
      "splits": {},
  }
  for s in SPLITS:
    manifest["splits"][s] = {**dataclasses.asdict(stats[s]), "shards": writers[s].shards}
  with open(os.path.join(tmp_dir, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp_dir, out_dir)
  return manifest


def check_out_dir(out_dir: str) -> None:
  """DataError unless ``out_dir`` is new, empty or a prepared data set: ``prepare`` replaces only those."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f"{out_dir}: is a file, not a directory; nothing written")
  if os.path.isdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)) and os.listdir(out_dir):
    raise DataError(f"{out_dir}: is not empty and not a prepared data set (no {MANIFEST}); choose a new or "
                    "empty directory (nothing written)")


def load_manifest(data_dir: str) -> dict[str, Any]:
  """Reads ``data_dir/manifest.json``; DataError if absent, malformed or of another format."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no manifest (not a prepared data directory, or preparation did not finish)")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def check_manifest(manifest: Mapping[str, Any], **expected) -> None:
  """Raises DataError naming the first field whose value differs from ``expected``.

  Args:
    manifest: from :func:`load_manifest` or :func:`prepare`.
    **expected: any of ``block_length, patch_size, vocab_size,
      tokenizer_fingerprint, pad_id, eos_id, mode, format``; None values are skipped.
  """
  unknown = set(expected) - set(CHECKABLE)
  if unknown:
    raise DataError(f"check_manifest: unknown field(s) {sorted(unknown)} (checkable: {', '.join(CHECKABLE)})")
  for field in CHECKABLE:
    want = expected.get(field)
    if want is None:
      continue
    got = manifest.get(field)
    if got != want:
      raise DataError(f"manifest field {field!r} is {got!r}, expected {want!r} "
                      f"(data from {manifest.get('source', '?')})")


def shard_paths(data_dir: str, manifest: Mapping[str, Any], split: str) -> list[str]:
  """Absolute paths of a split's shards; DataError if the split is unknown, empty or a file is missing."""
  if split not in manifest.get("splits", {}):
    raise DataError(f"{data_dir}: no split {split!r} (have {sorted(manifest.get('splits', {}))})")
  info = manifest["splits"][split]
  if not info["blocks"]:
    raise DataError(f"{data_dir}: split {split!r} has no blocks")
  paths = [os.path.join(data_dir, s["file"]) for s in info["shards"]]
  for p in paths:
    if not os.path.isfile(p):
      raise DataError(f"{p}: shard listed in the manifest is missing")
  return paths


def describe(manifest: Mapping[str, Any]) -> str:
  """One line per split for logs."""
  lines = [(f"{manifest['mode']} blocks of {manifest['block_length']} (K={manifest['patch_size']}), "
            f"vocab {manifest['vocab_size']}, from {manifest['source']}")]
  for s, info in manifest["splits"].items():
    lines.append(f"  {s}: {info['documents']} docs, {info['blocks']} blocks, {info['tokens']} tokens "
                 f"({info['pad_tokens']} pad, {info['dropped_tokens']} dropped)")
  return "\n".join(lines)

