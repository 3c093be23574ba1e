"""Metric writing that never stalls the device (STYLE §12).

  MetricWriter      JSON lines (``<workdir>/metrics.jsonl``) + TensorBoard events
                    (tensorboardX, ``<workdir>/tb``), written by process 0 only
  save_config_json  the resolved config as ``<workdir>/config.json`` (process 0)
  DeferredMetrics   "fetch step t-1 after dispatching step t": push the device
                    arrays of step t, get the host values of step t-1; raises
                    NonFiniteError on NaN/Inf
  ProgressBar       tqdm bar with steps and tokens/s (process 0)

Keys are namespaced: ``train/loss``, ``train/energy_loss``, ``eval/brierlm``,
``perf/tokens_per_sec``, ``perf/mfu``.

Typical loop::

  deferred = DeferredMetrics()
  for step in range(start, num_steps):
    state, m = train_step(state, batch)            # dispatched, not waited for
    ready = deferred.push(step, m, last_good_checkpoint=ckpt.latest_step())
    if ready:                                      # step - 1's values, on host
      writer.write(*ready)
  if (ready := deferred.flush()):
    writer.write(*ready)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(FloatingPointError):
  """A metric was NaN or Inf; the one-line message names the step and the last finite checkpoint.

  ``step`` is numbered as the caller numbers it (the train loop: as ``metrics.jsonl``
  and the checkpoints do, the first step being 1).  ``directory``, when given, is
  where that checkpoint lies.
  """

  def __init__(self, step: int, bad: Mapping[str, Any], last_good_checkpoint: int | None = None,
               directory: str | None = None):
    self.step, self.bad, self.last_good_checkpoint = step, dict(bad), last_good_checkpoint
    self.directory = directory
    where = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items()))
    if last_good_checkpoint is None:
      ckpt = "no checkpoint saved yet"
    else:
      ckpt = f"last finite checkpoint: step {last_good_checkpoint}"
      if directory:
        ckpt += f" in {directory}"
    super().__init__(f"non-finite metrics at step {step}: {where} ({ckpt}; nothing non-finite was saved)")


def _is_main() -> bool:
  return jax.process_index() == 0


def _to_python(value: Any) -> Any:
  """Host value -> JSON-friendly Python: scalars to float/int, arrays to lists."""
  arr = np.asarray(value)
  if jnp.issubdtype(arr.dtype, jnp.floating):  # includes bfloat16, which numpy does not know
    arr = arr.astype(np.float64)
  if arr.ndim == 0 or arr.size == 1:
    return arr.reshape(()).item()
  return arr.tolist()


def _config_to_dict(config: Any) -> dict:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    return config.to_dict()
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return dataclasses.asdict(config)
  return dict(config)


def save_config_json(workdir: str | os.PathLike, config: Any, name: str = "config.json") -> str | None:
  """Write ``config`` (dict, ConfigDict or dataclass) to ``<workdir>/<name>``; process 0 only.

  Values JSON cannot hold (dtypes, tuples of objects) are written with ``str``.
  Returns the path written, or ``None`` on other processes.
  """
  if not _is_main():
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.fspath(workdir), name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_config_to_dict(config), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, path)  # atomic: a crash never leaves half a config
  return path


def _summary_writer_class():
  """tensorboardX's ``SummaryWriter``, imported without PyTorch.

  tensorboardX imports torch when it is installed (the ``torch`` extra), only to
  accept torch tensors, which calm_jax never passes; that import costs ~20 s of
  every run's start-up.  Unless torch is already loaded, it is hidden for the
  duration of the import (``sys.modules[name] = None`` makes ``import`` raise
  ImportError, which tensorboardX handles).
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def truncate_rows_after(path: str, step: int) -> int:
  """Drop the rows of a JSON-lines metrics file whose ``step`` is > ``step``; returns how many went.

  A torn last line (a process killed mid-write) goes too.  The file is replaced
  atomically (written beside it, fsynced, renamed), so a kill during this leaves
  either the old or the new file.
  """
  if not os.path.isfile(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return 0
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return len(lines) - len(kept)


class MetricWriter:
  """Appends one JSON object per ``write`` to ``metrics.jsonl`` and scalars to TensorBoard.

  Only process 0 writes; elsewhere every method is a no-op.  Appending (not
  truncating) keeps the history of a resumed run in one file; with
  ``after_step`` (the step a run resumes from) the rows a killed process had
  logged past it are dropped first, so that the steps it runs again appear once.
  Every row reaches the operating system when it is written (the file is line
  buffered: a SIGKILL loses nothing written); :meth:`sync` also fsyncs it (the
  train loop calls it before each checkpoint).  TensorBoard events are only
  appended: after a resume, the re-run steps appear twice there.

  Args:
    workdir: run directory.
    tensorboard: also write TensorBoard events under ``<workdir>/tb``.
    after_step: drop existing rows with a larger ``step`` (None: keep every row).
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, after_step: int | None = None):
    self.enabled = _is_main()
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if after_step is not None:
      truncate_rows_after(self.path, int(after_step))
    self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - line buffered; closed in close()
    if tensorboard:
      self._tb = _summary_writer_class()(logdir=os.path.join(os.fspath(workdir), "tb"), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Write ``metrics`` (host values or arrays) for ``step``; non-scalars go to JSON only."""
    if not self.enabled:
      return
    values = {k: _to_python(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def sync(self) -> None:
    """Flush and fsync ``metrics.jsonl``: its rows survive a machine crash from here on."""
    self.flush()
    if self._file is not None:
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class DeferredMetrics:
  """Hold step t's metric arrays until step t+1 has been dispatched, then fetch them.

  ``jax.device_get`` on step t-1's arrays waits only for step t-1, which has
  finished (or nearly) while step t is queued, so the device never idles on the
  host.  Metric arrays must be fully addressable on this process (e.g.
  replicated scalars out of a jitted step).

  Args:
    check_finite: raise :class:`NonFiniteError` when a fetched float metric is
      NaN or Inf.  The error names the step the metrics belong to.
  """

  def __init__(self, check_finite: bool = True):
    self.check_finite = check_finite
    self._pending: tuple[int, Any, int | None] | None = None

  def push(
    self, step: int, device_metrics: Mapping[str, Any], last_good_checkpoint: int | None = None
  ) -> tuple[int, dict[str, Any]] | None:
    """Queue step ``step``'s metrics; return ``(step - 1's step, host values)`` or ``None``.

    ``last_good_checkpoint`` is reported in the error if the *returned* step's
    metrics are non-finite (pass the latest saved step at the time of the push).
    """
    ready = self._fetch()
    self._pending = (int(step), device_metrics, last_good_checkpoint)
    return ready

  def flush(self) -> tuple[int, dict[str, Any]] | None:
    """Fetch the last pushed step (call after the loop)."""
    ready = self._fetch()
    self._pending = None
    return ready

  def _fetch(self) -> tuple[int, dict[str, Any]] | None:
    if self._pending is None:
      return None
    step, device_metrics, ckpt = self._pending
    self._pending = None
    host = {k: _to_python(v) for k, v in jax.device_get(dict(device_metrics)).items()}
    if self.check_finite:
      bad = {k: v for k, v in host.items() if not _all_finite(v)}
      if bad:
        raise NonFiniteError(step, bad, ckpt)
    return step, host


def _all_finite(value: Any) -> bool:
  if isinstance(value, bool) or value is None:
    return True
  if isinstance(value, float):
    return math.isfinite(value)
  if isinstance(value, list):
    arr = np.asarray(value)
    return arr.dtype.kind not in "fc" or bool(np.all(np.isfinite(arr)))
  return True


class ProgressBar:
  """tqdm over steps showing tokens/s (smoothed over the interval between updates).

  Only process 0 shows a bar.  ``update(step, tokens)`` is cheap; call it with
  the step just fetched and the number of tokens that step consumed.
  """

  def __init__(self, total_steps: int, start_step: int = 0, desc: str = "train", window: int = 20,
               **tqdm_kwargs):
    from tqdm.auto import tqdm  # imported here: only the training entry point needs it

    self._bar = tqdm(
      total=total_steps,
      initial=start_step,
      desc=desc,
      dynamic_ncols=True,
      disable=not _is_main(),
      **tqdm_kwargs,
    )
    self._last_step, self._tokens = start_step, 0
    # (time, tokens so far) at the last few updates: tokens/s over a sliding window, because
    # metrics fetched one step late arrive in uneven bursts (one step's interval alone swings 10x).
    self._window: collections.deque = collections.deque([(time.perf_counter(), 0)], maxlen=window + 1)
    self.tokens_per_sec: float | None = None

  def update(self, step: int, tokens: int, **postfix: Any) -> None:
    """Advance the bar to ``step + 1`` (steps are 0-based) and refresh tokens/s."""
    self._tokens += tokens
    now = time.perf_counter()
    done = step + 1 - self._last_step
    if done > 0:
      self._window.append((now, self._tokens))
      (t0, n0), (t1, n1) = self._window[0], self._window[-1]
      if t1 > t0:
        self.tokens_per_sec = (n1 - n0) / (t1 - t0)
      self._bar.update(done)
      self._last_step = step + 1
    shown = {"tok/s": f"{self.tokens_per_sec:,.0f}"} if self.tokens_per_sec else {}
    shown.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
    self._bar.set_postfix(shown, refresh=False)

  def restart_rate(self) -> None:
    """Forget the window (after an evaluation, whose time is not training throughput)."""
    self._window.clear()
    self._window.append((time.perf_counter(), self._tokens))

  def close(self) -> None:
    self._bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
