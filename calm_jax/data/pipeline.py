"""Grain pipelines over prepared blocks: per-host numpy batches ``{'tokens': int32 [B, T]}``.

Training chain (STYLE.md item 10; the blocks are already tokenised and packed,
so there is no map(tokenise) or pack stage)::

  grain.MapDataset.source(ArrayRecord blocks)
    .shuffle(seed)                          # a fresh permutation each epoch
    .repeat()                               # infinite
    [process_index::process_count]          # this host's disjoint slice
    .map(decode) .batch(per-host batch)
    .to_iter_dataset(ReadOptions)           # thread prefetch
    [.mp_prefetch(workers)]                 # optional process prefetch

Global step ``s`` consumes global elements ``[s*G, (s+1)*G)`` of the shuffled,
repeated stream (G = global batch), host ``p`` taking those congruent to ``p``
mod ``process_count``. The iterator's ``get_state()`` is a small JSON-able dict
and ``set_state()`` resumes exactly where it was: the batches after a restore
equal the batches an uninterrupted run would have read. Save it with orbax
through ``grain.checkpoint.CheckpointSave(iterator)`` (one file per process, so a
restore needs the same process count).

Evaluation chain: the blocks in file order, padded (or cut) to a multiple of the
global batch so that every host yields the same number of batches (hosts that
ran out early would otherwise hang the others in a collective), then sliced and
batched; one pass; ``{'tokens': [B, T], 'row_mask': bool [B]}`` where
``row_mask`` is False for padding rows (all PAD).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from calm_jax.data import blocks as blocks_lib
from calm_jax.data.errors import DataError


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _per_host_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f"global_batch_size {global_batch_size} is not a positive multiple of "
                    f"process_count {process_count}")
  return global_batch_size // process_count


def _open(data_dir: str, split: str, expect: Mapping[str, Any] | None):
  manifest = blocks_lib.load_manifest(data_dir)
  if expect:
    blocks_lib.check_manifest(manifest, **expect)
  paths = blocks_lib.shard_paths(data_dir, manifest, split)
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) != manifest["splits"][split]["blocks"]:
    raise DataError(f"{data_dir}: split {split!r} shards hold {len(source)} blocks, manifest says "
                    f"{manifest['splits'][split]['blocks']}")
  return manifest, source


def _decoder(block_length: int):
  def decode(record: bytes) -> dict[str, np.ndarray]:
    tokens_T = np.frombuffer(record, dtype=blocks_lib.TOKEN_DTYPE).astype(np.int32)
    if tokens_T.shape != (block_length,):
      raise DataError(f"block of {tokens_T.size} tokens, manifest says {block_length}")
    return {"tokens": tokens_T}
  return decode


def _finish(ds: grain.MapDataset, read_threads: int, prefetch_batches: int,
            worker_count: int) -> grain.DatasetIterator:
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches))
  if worker_count > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags; outside app.run (a notebook, a
      # test) nothing parsed them, so accept the defaults instead of failing.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def make_train_iterator(data_dir: str, split: str = "train", global_batch_size: int = 8, seed: int = 0,
                        process_index: int | None = None, process_count: int | None = None, *,
                        expect: Mapping[str, Any] | None = None, read_threads: int = 2,
                        prefetch_batches: int = 2, worker_count: int = 0) -> grain.DatasetIterator:
  """An infinite, seeded, checkpointable iterator of this host's training batches.

  Args:
    data_dir: a directory written by ``prepare``.
    split: ``"train"`` (or ``"valid"``, to overfit on it).
    global_batch_size: blocks per step over all hosts; divisible by process_count.
    seed: shuffle seed; the same seed gives the same stream on any machine.
    process_index, process_count: this host's slice; default ``jax.process_index()``
      and ``jax.process_count()``.
    expect: fields for ``check_manifest`` (e.g. block_length, patch_size,
      vocab_size, tokenizer_fingerprint), checked before anything is read.
    read_threads, prefetch_batches: thread prefetch of whole batches.
    worker_count: if > 0, also ``mp_prefetch`` with this many processes (the
      stream is unchanged: slicing happens before batching).

  Returns:
    A ``grain.DatasetIterator`` yielding ``{'tokens': int32 [global_batch_size //
    process_count, block_length]}`` with ``get_state()`` / ``set_state()``.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  per_host = _per_host_batch(global_batch_size, process_count)
  manifest, source = _open(data_dir, split, expect)
  ds = (grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat()
        .slice(slice(process_index, None, process_count))
        .map(_decoder(manifest["block_length"]))
        .batch(per_host, drop_remainder=True))
  return _finish(ds, read_threads, prefetch_batches, worker_count)


def num_eval_batches(num_blocks: int, global_batch_size: int, drop_remainder: bool) -> int:
  """Batches every host yields from ``make_eval_iterator`` for a split of num_blocks blocks."""
  full, tail = divmod(num_blocks, global_batch_size)
  return full + (0 if drop_remainder or not tail else 1)


def make_eval_iterator(data_dir: str, split: str = "valid", global_batch_size: int = 8,
                       process_index: int | None = None, process_count: int | None = None, *,
                       drop_remainder: bool = False, expect: Mapping[str, Any] | None = None,
                       read_threads: int = 2, prefetch_batches: int = 2) -> grain.DatasetIterator:
  """One deterministic pass over a split, the same number of batches on every host.

  With ``drop_remainder=False`` the last global batch is completed with rows of
  PAD whose ``row_mask`` is False; with True the blocks after the last full global
  batch are skipped. Blocks are read in file order, no shuffle.

  Returns:
    An iterator of ``{'tokens': int32 [global_batch_size // process_count, T],
    'row_mask': bool [global_batch_size // process_count]}``; it stops after
    ``num_eval_batches(...)`` batches.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  per_host = _per_host_batch(global_batch_size, process_count)
  manifest, source = _open(data_dir, split, expect)
  num_blocks, block_length = len(source), manifest["block_length"]
  total = num_eval_batches(num_blocks, global_batch_size, drop_remainder) * global_batch_size
  if total == 0:
    raise DataError(f"{data_dir}: split {split!r} has {num_blocks} blocks, fewer than one "
                    f"global batch of {global_batch_size} (use drop_remainder=False)")
  decode = _decoder(block_length)
  pad_row = np.full((block_length,), manifest["pad_id"], np.int32)

  def read(index: int) -> dict[str, np.ndarray]:
    if index < num_blocks:
      return {**decode(source[index]), "row_mask": np.bool_(True)}
    return {"tokens": pad_row, "row_mask": np.bool_(False)}

  ds = (grain.MapDataset.range(total)
        .map(read)
        .slice(slice(process_index, None, process_count))
        .batch(per_host, drop_remainder=True))
  return _finish(ds, read_threads, prefetch_batches, worker_count=0)
