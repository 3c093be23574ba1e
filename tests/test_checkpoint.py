"""Tests for calm_jax.training.checkpoint: roundtrip, retention, resume order, corruption, SIGTERM, data state."""

import logging
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from calm_jax.training import checkpoint as ck


def _state(offset=0.0):
  params = {
    "dense": {"kernel": jnp.arange(6.0).reshape(2, 3) + offset},
    "norm": {"scale": jnp.ones((3,), jnp.bfloat16)},
  }
  tx = optax.adamw(1e-3)
  opt_state = jax.tree.map(lambda x: x + offset if x.dtype != jnp.int32 else x, tx.init(params))
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(int(offset), jnp.int32)}


def _abstract():
  return jax.eval_shape(_state)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _dataset():
  return grain.MapDataset.range(40).shuffle(seed=3).batch(4)


def test_roundtrip_exact_with_config(tmp_path):
  state = _state(5.0)
  config = ml_collections.ConfigDict({"model": {"d": 8}})
  with ck.Checkpointer(tmp_path / "ckpt", save_interval_steps=10, config=config) as c:
    assert c.maybe_save(5, state, force=True)
    c.wait()
  with ck.Checkpointer(tmp_path / "ckpt", save_interval_steps=10) as c:
    restored = c.restore(_abstract())
    assert c.read_config() == {"model": {"d": 8}}
  assert (restored.step, restored.source, restored.config) == (5, "resume", {"model": {"d": 8}})
  _assert_tree_equal(restored.state, state)
  assert isinstance(restored.state["opt_state"][0], optax.ScaleByAdamState)


def test_interval_keep_last_n_and_resume_latest(tmp_path):
  with ck.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as c:
    saved = [s for s in range(1, 8) if c.maybe_save(s, _state(s))]
    assert saved == [2, 4, 6]
    c.save_final(7, _state(7))
    c.save_final(7, _state(7))  # already saved: a no-op, not an error
    assert c.all_steps() == [6, 7]
  with ck.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as c:
    restored = c.restore(_abstract())
    assert restored.step == 7
    _assert_tree_equal(restored.state, _state(7))
    assert c.restore(_abstract(), step=6).step == 6


def _delete_a_file(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def _garble_files(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.write(b"\x00garbage" * max(1, size // 8))


@pytest.mark.parametrize("corrupt", [_delete_a_file, _garble_files])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
  directory = tmp_path / "ckpt"
  with ck.Checkpointer(directory, save_interval_steps=1, max_to_keep=3) as c:
    for s in (1, 2, 3):
      c.maybe_save(s, _state(s))
  corrupt(directory / "3")
  with (
    caplog.at_level(logging.WARNING, logger="calm_jax.training.checkpoint"),
    ck.Checkpointer(directory, save_interval_steps=1, max_to_keep=3) as c,
  ):
    restored = c.restore(_abstract())
    assert restored.step == 2
    _assert_tree_equal(restored.state, _state(2))
    # The unreadable step was moved aside, not deleted, and can be saved again.
    assert c.all_steps() == [1, 2]
    assert c.maybe_save(3, _state(3))
    c.wait()
    assert c.restore(_abstract()).step == 3
  unreadable = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert any(str(directory / "3") in m for m in unreadable), unreadable
  assert len(os.listdir(f"{directory}.unreadable")) == 1


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    c.maybe_save(1, _state(1))
  _delete_a_file(tmp_path / "1")
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    with pytest.raises(ck.CheckpointError, match="no readable checkpoint.*step 1"):
      c.restore(_abstract())
    assert c.all_steps() == [1]  # nothing moved when nothing restored
  with (
    ck.Checkpointer(tmp_path / "empty", save_interval_steps=1) as c,
    pytest.raises(ck.CheckpointError, match="no checkpoint in"),
  ):
    c.restore(_abstract())


def test_sigterm_sets_flag():
  flag = ck.install_preemption_handler()
  try:
    assert not flag
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag and flag.is_set()
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_grain_iterator_state_saved_and_restored(tmp_path):
  it = iter(_dataset())
  for _ in range(3):
    next(it)
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    c.maybe_save(3, _state(3), it)
    # The position is captured at save time, even though the save is asynchronous.
    expected = [next(it) for _ in range(2)]
  fresh = iter(_dataset())
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    restored = c.restore(_abstract(), fresh)
  assert restored.step == 3
  for want in expected:
    np.testing.assert_array_equal(next(fresh), want)


class _CountingIterator:
  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return self.i

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_generic_iterator_state_via_json(tmp_path):
  it = _CountingIterator()
  next(it), next(it)
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    c.maybe_save(2, _state(2), it)
  other = _CountingIterator()
  with ck.Checkpointer(tmp_path, save_interval_steps=1) as c:
    c.restore(_abstract(), other)
  assert next(other) == 3


def test_restore_params_and_resume_order(tmp_path):
  stage1 = tmp_path / "stage1"
  with ck.Checkpointer(stage1, save_interval_steps=1) as c:
    c.maybe_save(9, _state(9))
  abstract_params = jax.eval_shape(lambda: _state()["params"])
  params = ck.restore_params(stage1, abstract_params)
  _assert_tree_equal(params, _state(9)["params"])
  _assert_tree_equal(ck.restore_params(stage1 / "9", abstract_params), params)

  with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing"):
    ck.restore_params(tmp_path / "missing", abstract_params)
  # A nested subtree by path; a path that is not there is an error, not a silent no-op.
  norm = ck.restore_params(stage1, abstract_params["norm"], key="params/norm")
  _assert_tree_equal(norm, _state(9)["params"]["norm"])
  with pytest.raises(ck.CheckpointError, match=r"has no params\['scale'\]"):
    ck.restore_params(stage1, abstract_params["norm"], key="params")

  def from_other(path):
    return {**_state(0), "params": ck.restore_params(path, abstract_params)}

  run = tmp_path / "stage2"
  with ck.Checkpointer(run, save_interval_steps=1) as c:
    fresh = ck.resume_or_init(c, _abstract(), lambda: _state(0))
    assert (fresh.source, fresh.step) == ("fresh", 0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
      ck.resume_or_init(
        c, _abstract(), lambda: _state(0), init_from=str(tmp_path / "nowhere"), from_other=from_other
      )
    init = ck.resume_or_init(c, _abstract(), lambda: _state(0), init_from=str(stage1), from_other=from_other)
    assert init.source == "init_from"
    _assert_tree_equal(init.state["params"], _state(9)["params"])
    c.maybe_save(1, init.state)
    c.wait()
    resumed = ck.resume_or_init(
      c, _abstract(), lambda: _state(0), init_from=str(stage1), from_other=from_other
    )
    assert (resumed.source, resumed.step) == ("resume", 1)


def _nan_state(offset):
  state = _state(offset)
  state["params"]["dense"]["kernel"] = state["params"]["dense"]["kernel"].at[0, 0].set(jnp.nan)
  return state


def test_non_finite_state_is_never_saved_nor_resumed(tmp_path, caplog):
  with ck.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as c:
    c.maybe_save(1, _state(1))
    with pytest.raises(ck.CheckpointError, match="step 2: the state holds NaN or Inf; not saved"):
      c.maybe_save(2, _nan_state(2))
    c.wait()
    assert c.all_steps() == [1]   # max_to_keep=1 cannot push the finite step 1 out with a NaN save
  with ck.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=3) as c:
    # What an older calm_jax could leave behind: NaN checkpoints newer than the last finite one.
    c.maybe_save(2, _nan_state(2), check_finite=False)
    c.maybe_save(3, _nan_state(3), check_finite=False)
    c.wait()
  with ck.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as c:
    with caplog.at_level(logging.WARNING, logger="calm_jax.training.checkpoint"):
      restored = c.restore(_abstract())
    assert restored.step == 1    # the newest finite one
    _assert_tree_equal(restored.state, _state(1))
    assert c.all_steps() == [1]  # the NaN steps moved aside (kept, out of the run and of max_to_keep)
    assert len(os.listdir(f"{tmp_path}.nonfinite")) == 2
    assert any("holds NaN or Inf" in r.getMessage() for r in caplog.records)
  with ck.Checkpointer(tmp_path / "all_nan", save_interval_steps=1) as c:
    c.maybe_save(1, _nan_state(1), check_finite=False)
    c.wait()
    with pytest.raises(ck.CheckpointError, match="no readable checkpoint.*step 1: NaN or Inf values"):
      c.restore(_abstract())


def test_closed_event_loop_noise_is_dropped():
  import types
  seen = []
  hook = ck._drop_closed_loop_errors(seen.append)
  hook(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))   # a collected orbax coroutine
  hook(types.SimpleNamespace(exc_value=RuntimeError("something else")))
  assert [str(u.exc_value) for u in seen] == ["something else"]
