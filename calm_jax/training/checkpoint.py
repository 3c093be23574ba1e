"""Checkpointing: the one module that imports orbax (STYLE §9).

One checkpoint step directory holds, side by side:

  state      the train-state pytree (params, opt_state, step, ...), saved with
             ``StandardSave`` and restored with ``StandardRestore`` onto an
             abstract target, so arrays land with the target's shardings/dtypes
  data       a grain iterator's state (``grain.checkpoint.CheckpointSave``, one
             JSON file per process: a restore needs the same process count), or
  data_json  the JSON state of any other iterator with ``get_state/set_state``
             (single-process only: orbax writes JSON items from process 0)
  config     the resolved experiment config, as JSON

Saves are asynchronous (``wait()``/``close()`` block until they are on disk),
happen every ``save_interval_steps`` or when forced (SIGTERM, end of training),
and the last ``max_to_keep`` steps are kept.

Resume order (:func:`resume_or_init`, the only place it is written):
  1. the latest *readable* checkpoint in this run's directory;
  2. else a state built from another run's checkpoint (e.g. stage-1 autoencoder
     parameters loaded read-only with :func:`restore_params`);
  3. else a fresh state.

An unreadable latest checkpoint (a file deleted, truncated or garbled) is
reported in a one-line warning naming its directory and the previous step is
tried.  Once an older step restores, the unreadable newer ones are *moved* (never
deleted) to ``<directory>.unreadable/`` so that the run can save those steps
again and they do not count towards ``max_to_keep``.  If no step is readable a
:class:`CheckpointError` lists each step's reason and nothing is moved.

A checkpoint holding NaN or Inf (:func:`all_finite` of the restored state) is
treated the same way: a restart never resumes from a non-finite state; such
steps move to ``<directory>.nonfinite/``.  The train loop checks a state before
saving it, so only checkpoints written before that check existed can be
non-finite; hence ``max_to_keep`` never deletes the last finite checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any
log = logging.getLogger(__name__)

STATE, DATA, DATA_JSON, CONFIG = "state", "data", "data_json", "config"


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was required."""


# --------------------------------------------------------------------------- SIGTERM


class PreemptionFlag:
  """Set (from a signal handler) when the job should save and stop; truthy once set."""

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def set(self) -> None:
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  __bool__ = is_set

  def uninstall(self) -> None:
    """Put back the signal handlers that were there before ``install_preemption_handler``."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


def install_preemption_handler(signals=(signal.SIGTERM,)) -> PreemptionFlag:
  """Install handlers that only set a flag; the train loop saves when it sees it.

  The handler does no I/O: saving from inside a signal handler could interleave
  with an ongoing save.  The loop should call
  ``ckpt.maybe_save(step, state, data_iter, force=bool(flag))`` every step and
  stop once that forced save returned.  A previously installed Python handler is
  still called.  Must be called from the main thread.

  Multi-process runs: JAX's preemption service (started by
  ``jax.distributed.initialize``) also notices SIGTERM and makes every process
  save at the same step through orbax's ``PreemptionCheckpointingPolicy``, which
  :class:`Checkpointer` includes; this flag alone is per-process.
  """
  flag = PreemptionFlag()
  for sig in signals:
    previous = signal.getsignal(sig)

    def handler(signum, frame, previous=previous):
      flag.set()
      if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
        previous(signum, frame)

    flag._previous[sig] = previous
    signal.signal(sig, handler)
  return flag


# --------------------------------------------------------------------------- orbax's event loop


def _is_closed_loop_error(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


class _ClosedLoopFilter(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_is_closed_loop_error(exc) or "Event loop is closed" in record.getMessage())


def _quiet_closed_event_loops() -> None:
  """Silence ``RuntimeError: Event loop is closed`` left behind by a failed orbax read.

  When a read of a corrupt checkpoint fails, orbax's other pending reads are
  abandoned; collected after their event loop closed, each prints that
  traceback (20-80 of them), burying the one-line report of the failure itself.
  Only that error is dropped: everything else reaches the previous hooks.
  """
  if getattr(sys.unraisablehook, "_calm_jax", False):
    return
  sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)
  threading.excepthook = _drop_closed_loop_errors(threading.excepthook)
  logging.getLogger("asyncio").addFilter(_ClosedLoopFilter())


def _drop_closed_loop_errors(previous: Callable) -> Callable:
  """A ``sys.unraisablehook`` / ``threading.excepthook`` passing all but that error on to ``previous``."""

  def hook(info):
    if not _is_closed_loop_error(info.exc_value):
      previous(info)

  hook._calm_jax = True
  return hook


_quiet_closed_event_loops()


# --------------------------------------------------------------------------- helpers


@jax.jit
def _leaves_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: PyTree) -> bool:
  """True when every floating-point array of ``tree`` is free of NaN and Inf (one device reduction)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return not leaves or bool(_leaves_finite(leaves))



def _default_sharding() -> jax.sharding.Sharding:
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_target(tree: PyTree) -> PyTree:
  """Shape/dtype/sharding target for a restore, from arrays or ShapeDtypeStructs.

  Leaves without a sharding (e.g. straight from ``jax.eval_shape``) are restored
  fully replicated over all devices; pass shardings for anything large.
  """
  defaulted = []

  def one(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      defaulted.append(1)
      sharding = _default_sharding()
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  out = jax.tree.map(one, tree)
  if defaulted:
    log.info("restore: %d leaves had no sharding; restoring them replicated", len(defaulted))
  return out


def _is_grain_iterator(it) -> bool:
  return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _jsonable(config: Any) -> dict:
  """dict / ConfigDict -> plain JSON types, now (a later mutation must not change saves)."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(config, default=str))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only needed on multi-host runs

    multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What :meth:`Checkpointer.restore` and :func:`resume_or_init` return.

  ``source`` is ``"resume"`` (this run's checkpoint), ``"init_from"`` (another
  run's checkpoint) or ``"fresh"``; ``step`` is the step to continue from (the
  restored checkpoint's step; 0 otherwise); ``config`` is the saved config dict
  when resuming (``None`` otherwise).
  """

  state: PyTree
  step: int
  source: str
  path: str | None = None
  config: dict | None = None


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Asynchronous, interval-based checkpointing of state + data iterator + config.

  Args:
    directory: where step directories go (e.g. ``<workdir>/checkpoints``).
    save_interval_steps: ``maybe_save`` saves when ``step % interval == 0``.
    max_to_keep: keep the newest N steps (``None`` keeps all).
    config: the resolved experiment config (dict or ``ConfigDict``), saved as
      JSON with every checkpoint; values JSON cannot hold are written as ``str``.
    async_save: write in a background thread (the step returns at once after the
      device->host copy).

  Use as a context manager or call :meth:`close`, which waits for pending saves.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_interval_steps: int,
    max_to_keep: int | None = 3,
    config: dict | None = None,
    async_save: bool = True,
  ):
    if save_interval_steps < 1:
      raise ValueError(f"Checkpointer.save_interval_steps must be >= 1 (got {save_interval_steps})")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"Checkpointer.max_to_keep must be >= 1 or None (got {max_to_keep})")
    self.directory = epath.Path(directory).absolute()
    self._config = _jsonable(config) if config is not None else None
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.AnySavePolicy(
        [
          policies.FixedIntervalPolicy(save_interval_steps),
          policies.PreemptionCheckpointingPolicy(),
        ]
      ),
      preservation_policy=policies.LatestN(max_to_keep),
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  # -- queries
  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def should_save(self, step: int) -> bool:
    """Whether ``maybe_save(step, ...)`` would save now (the interval or a preemption says so)."""
    step = int(step)
    return step not in self._mngr.all_steps() and bool(self._mngr.should_save(step))

  # -- saving
  def maybe_save(self, step: int, state: PyTree, data_iter: Any = None, *, force: bool = False,
                 check_finite: bool = True) -> bool:
    """Save if the interval (or a preemption, or ``force``) says so; True if a save started.

    ``data_iter``'s position is captured before this returns, so the loop may
    advance it at once.  A step that is already saved is not saved again
    (e.g. a final save right after an interval save).  A state holding NaN or
    Inf is never saved (``check_finite``: :class:`CheckpointError`; pass False
    only when the caller has just checked), so that keeping the newest
    ``max_to_keep`` steps never deletes the last finite one.
    """
    step = int(step)
    if step in self._mngr.all_steps():
      return False
    if not force and not self._mngr.should_save(step):
      return False
    if check_finite and not all_finite(state):
      raise CheckpointError(f"step {step}: the state holds NaN or Inf; not saved in {self.directory}")
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      if _is_grain_iterator(data_iter):
        items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
      elif hasattr(data_iter, "get_state") and hasattr(data_iter, "set_state"):
        items[DATA_JSON] = ocp.args.JsonSave(data_iter.get_state())
      else:
        raise TypeError(f"maybe_save: data_iter {type(data_iter).__name__} has no get_state/set_state")
    if self._config is not None:
      items[CONFIG] = ocp.args.JsonSave(self._config)
    return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))

  def save_final(self, step: int, state: PyTree, data_iter: Any = None, *, check_finite: bool = True) -> None:
    """Save unconditionally (unless this step is saved already) and wait until it is on disk."""
    self.maybe_save(step, state, data_iter, force=True, check_finite=check_finite)
    self.wait()

  def wait(self) -> None:
    """Block until pending asynchronous saves are complete; raises their errors."""
    self._mngr.wait_until_finished()
    self._mngr.check_for_errors()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- restoring
  def restore(self, abstract_state: PyTree, data_iter: Any = None, *, step: int | None = None,
              check_finite: bool = True) -> Restored:
    """Restore ``step`` (default: the newest readable, finite one) onto ``abstract_state``.

    ``data_iter``, if given, has its position set in place.  With ``step=None``
    an unreadable newest checkpoint, or one holding NaN/Inf (``check_finite``),
    is skipped with a warning and the previous one is used (see the module
    docstring).  Raises :class:`CheckpointError` if there is no checkpoint or
    none is readable and finite.
    """
    self._mngr.reload()
    steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = abstract_target(abstract_state)
    failed: list[tuple[int, str]] = []
    nonfinite: list[int] = []
    for s in steps:
      try:
        state, config = self._restore_step(s, target, data_iter)
      except Exception as err:  # noqa: BLE001 - any unreadable file; the error is reported below
        failed.append((s, _one_line(err)))
        continue
      if check_finite and not all_finite(state):
        nonfinite.append(s)
        continue
      # Warnings only when an older step took over; if none does, the one error below says it all.
      for f, reason in failed:
        log.warning("checkpoint %s is unreadable (%s); using step %d", self.step_dir(f), reason, s)
      for f in nonfinite:
        log.warning("checkpoint %s holds NaN or Inf values; using step %d", self.step_dir(f), s)
      if failed:
        self._move_aside([f for f, _ in failed])
      if nonfinite:
        self._move_aside(nonfinite, ".nonfinite")
      return Restored(state, s, "resume", str(self.step_dir(s)), config)
    reasons = sorted([*failed, *((s, "NaN or Inf values") for s in nonfinite)], reverse=True)
    raise CheckpointError(
      f"no readable checkpoint in {self.directory}: "
      + "; ".join(f"step {s}: {r}" for s, r in reasons)
    )

  def _restore_step(self, step: int, target: PyTree, data_iter: Any):
    step_dir = self.step_dir(step)
    items = {STATE: ocp.args.StandardRestore(target)}
    has_config = (step_dir / CONFIG).exists()
    if has_config:
      items[CONFIG] = ocp.args.JsonRestore()
    if data_iter is not None:
      if (step_dir / DATA).exists():
        if not _is_grain_iterator(data_iter):
          raise TypeError(
            f"{step_dir} holds a grain iterator state, but data_iter is a {type(data_iter).__name__}"
          )
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
      elif (step_dir / DATA_JSON).exists():
        items[DATA_JSON] = ocp.args.JsonRestore()
      else:
        log.warning("checkpoint %s has no data-iterator state; the iterator is not moved", step_dir)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if DATA_JSON in items:
      data_iter.set_state(out[DATA_JSON])
    return out[STATE], (dict(out[CONFIG]) if has_config else None)

  def _move_aside(self, steps: list[int], suffix: str = ".unreadable") -> None:
    """Move step dirs to ``<directory><suffix>/<step>-<time>`` (process 0): kept, but out of the run."""
    if jax.process_index() == 0:
      aside = epath.Path(str(self.directory) + suffix)
      aside.mkdir(parents=True, exist_ok=True)
      for s in steps:
        dest = aside / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.step_dir(s).rename(dest)  # epath: also works on gs:// paths
        log.warning("moved %s checkpoint %s to %s", suffix.lstrip("."), self.step_dir(s), dest)
    _sync("calm_jax_checkpoint_move_aside")
    self._mngr.reload()

  def read_config(self, step: int | None = None) -> dict | None:
    """The config saved with ``step`` (default latest), or ``None`` if absent."""
    step = self.latest_step() if step is None else step
    if step is None or not (self.step_dir(step) / CONFIG).exists():
      return None
    return dict(self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])


# --------------------------------------------------------------------------- other runs


def _resolve_item_dir(path: epath.Path, item: str) -> epath.Path:
  """Accept a run's checkpoint directory (-> newest step), a step dir, or the item dir."""
  if (path / item).is_dir():
    return path / item
  steps = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
  for s in steps:
    if (path / str(s) / item).is_dir():
      return path / str(s) / item
  if (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists():
    return path
  raise CheckpointError(f"no '{item}' checkpoint item under {path}")


def restore_params(
  path: str | os.PathLike, abstract_params: PyTree, *, item: str = STATE, key: str | None = "params"
) -> PyTree:
  """Read-only restore of the subtree ``<item>/<key>`` from another run's checkpoint.

  Only the requested arrays are read (partial restore), not the optimizer state.

  Args:
    path: that run's checkpoint directory (its newest step is used), one step
      directory, or the item directory itself.
    abstract_params: target pytree (ShapeDtypeStructs or arrays); shardings and
      dtypes of the result follow it.
    item: the checkpoint item holding the train state.
    key: where the subtree sits inside the saved state, ``/``-separated
      (``"params"``, ``"params/autoencoder"``); ``None``: the whole item.

  Raises:
    FileNotFoundError: ``path`` does not exist (one line naming it).
    CheckpointError: no such item under ``path``, or a requested array is not
      in the checkpoint (orbax's partial restore would silently return the
      target for it).
  """
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"restore_params: no checkpoint at {root}")
  item_dir = _resolve_item_dir(root, item)
  keys = [] if key is None else key.strip("/").split("/")
  target = abstract_target(abstract_params)
  for k in reversed(keys):
    target = {k: target}
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
      item_dir,
      args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
      ),
    )
  for k in keys:
    restored = restored[k]
  missing = [
    jax.tree_util.keystr(p)
    for p, x in jax.tree_util.tree_leaves_with_path(restored)
    if isinstance(x, jax.ShapeDtypeStruct)
  ]
  if missing:
    raise CheckpointError(
      f"restore_params: {item_dir} has no {key or ''}{missing[0]}"
      + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else "")
    )
  log.info("restored parameters from %s", item_dir)
  return restored


def resume_or_init(
  ckpt: Checkpointer,
  abstract_state: PyTree,
  fresh: Callable[[], PyTree],
  *,
  data_iter: Any = None,
  init_from: str | None = None,
  from_other: Callable[[str], PyTree] | None = None,
) -> Restored:
  """The resume order, in one place: this run -> another run's checkpoint -> fresh.

  Args:
    ckpt: this run's checkpointer.
    abstract_state: restore target (shapes, dtypes, shardings) of the train state.
    fresh: builds a newly initialised train state.
    data_iter: iterator whose position is restored in place when resuming.
    init_from: another run's checkpoint path (e.g. the stage-1 autoencoder), used
      only when this run has no checkpoint yet.
    from_other: ``from_other(init_from) -> state``, e.g. ``fresh()`` with its
      frozen parameters replaced by ``restore_params(init_from, ...)``.
  """
  if ckpt.all_steps():
    restored = ckpt.restore(abstract_state, data_iter)
    log.info("resuming from %s", restored.path)
    return restored
  if init_from:
    if from_other is None:
      raise ValueError("resume_or_init: init_from is set but from_other is None")
    if not epath.Path(init_from).exists():
      raise FileNotFoundError(f"resume_or_init: init_from checkpoint {init_from} does not exist")
    log.info("initialising from %s", init_from)
    return Restored(from_other(init_from), 0, "init_from", str(init_from))
  log.info("no checkpoint in %s; starting fresh", ckpt.directory)
  return Restored(fresh(), 0, "fresh")
