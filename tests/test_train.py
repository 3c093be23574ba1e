"""A few steps of each trainer reduce the loss on tiny data; NaN stops the run naming the step."""

import os

import pytest

from calm_jax.training import metrics, train, trainers
from experiments import registry


def _config(name, steps=8, **edits):
  c = registry.get_config(name)
  with c.unlocked():
    c.train.steps = steps
    c.train.global_batch_size = 8
    c.train.eval_batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.eval_batches = 2
    c.eval.brier = False         # BrierLM compiles its own programs; one test below turns it on
    for k, v in edits.items():
      sec, f = k.split(".")
      c[sec][f] = v
  return c


def _one_layer(c):
  """The baseline with one decoder layer: these tests check the loop, not the model (half the
  tracing and compiling of a two-layer program)."""
  with c.unlocked():
    c.model.backbone.num_hidden_layers = 1
  return c


def _losses(workdir):
  return [r["train/loss"] for r in train.read_metrics(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def ae_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ae"))
  out = train.run(_config("ae_tiny", steps=12), wd)
  return wd, out


def test_autoencoder_loss_decreases(ae_workdir):
  wd, out = ae_workdir
  losses = _losses(wd)
  assert len(losses) == 12
  assert min(losses[-3:]) < losses[0]
  assert 0.0 <= out["eval/token_acc"] <= 1.0 and out["eval/count"] > 0


def test_energy_loss_decreases_on_frozen_autoencoder(ae_workdir, tmp_path):
  # BrierLM at the final evaluation, on 128-token pieces of the 256-token held-out blocks.
  c = _config("calm_tiny", steps=8, **{"optim.learning_rate": 3e-3, "eval.brier": True,
                                       "eval.block_length": 128, "eval.num_blocks": 8})
  with c.unlocked():
    c.ae_workdir = ae_workdir[0]
  out = train.run(c, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert sum(losses[-2:]) / 2 < losses[0]
  assert "eval/energy_loss" in out
  assert 0.0 <= out["eval/brierlm"] <= 100.0 and out["eval/brierlm_se"] >= 0.0
  assert all(-1.0 <= out[f"eval/brier{n}"] <= 1.0 for n in range(1, 5))
  at_chance = any(out[f"eval/brier{n}"] <= 0 for n in range(1, 5))
  assert out["eval/block_length"] == 128 and out["eval/at_chance"] == at_chance
  assert out["eval/brierlm"] == 0.0 or not at_chance
  # Throughput rows: every logged step after the first has tokens/s and an MFU in (0, 1).
  perf = [r for r in train.read_metrics(str(tmp_path)) if "perf/mfu" in r]
  assert len(perf) == 7
  assert all(0.0 < r["perf/mfu"] < 1.0 and r["perf/tokens_per_sec"] > 0 for r in perf)


def test_brier_settings_are_validated():
  c = _config("transformer_tiny", **{"eval.brier": True, "eval.block_length": 100})
  with pytest.raises(train.ConfigError, match=r"^eval\.block_length: 100 does not divide data\.block_length=256"):
    train.resolve(c, check_paths=False)
  c = _config("ae_tiny", **{"eval.brier": True})
  with pytest.raises(train.ConfigError, match=r"^eval\.brier: "):
    train.resolve(c, check_paths=False)


def test_transformer_loss_decreases(tmp_path):
  out = train.run(_one_layer(_config("transformer_tiny", steps=8, **{"optim.learning_rate": 3e-3})), str(tmp_path))
  losses = _losses(str(tmp_path))
  assert losses[-1] < losses[0] - 0.1
  assert out["eval/ce"] > 0


def test_nan_names_the_step(tmp_path, monkeypatch):
  real = trainers.make_train_step

  def poisoned(*a, **kw):
    step_fn = real(*a, **kw)

    def step(state, batch, key, ae_params=None):
      new, m = step_fn(state, batch, key, ae_params)
      m = dict(m)
      m["train/loss"] = m["train/loss"] / (state["step"] != 3)   # inf in the 4th update: step 4
      return new, m
    return step

  monkeypatch.setattr(trainers, "make_train_step", poisoned)
  c = _one_layer(_config("transformer_tiny", steps=6, **{"train.checkpoint_every": 2}))
  # Steps count from 1 as metrics.jsonl and the checkpoints do; step 4 would have been saved: it is not.
  expected = r"at step 4: train/loss=inf .*last finite checkpoint: step 2 in"
  with pytest.raises(metrics.NonFiniteError, match=expected):
    train.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert [r["step"] for r in train.read_metrics(str(tmp_path))] == [1, 2, 3]
