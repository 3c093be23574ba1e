"""A few steps of each trainer reduce the loss on tiny data; NaN stops the run naming the step."""

import pytest

from calm_jax import metrics, train, trainers
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
    for k, v in edits.items():
      sec, f = k.split(".")
      c[sec][f] = v
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
  c = _config("calm_tiny", steps=8, **{"optim.learning_rate": 3e-3})
  with c.unlocked():
    c.ae_workdir = ae_workdir[0]
  out = train.run(c, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert sum(losses[-2:]) / 2 < losses[0]
  assert "eval/energy_loss" in out


def test_transformer_loss_decreases(tmp_path):
  out = train.run(_config("transformer_tiny", steps=8, **{"optim.learning_rate": 3e-3}), str(tmp_path))
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
      m["train/loss"] = m["train/loss"] / (state["step"] != 3)   # inf at step 3
      return new, m
    return step

  monkeypatch.setattr(trainers, "make_train_step", poisoned)
  c = _config("transformer_tiny", steps=6, **{"train.checkpoint_every": 2})
  with pytest.raises(metrics.NonFiniteError, match=r"at step 3: .*last good checkpoint: step 2"):
    train.run(c, str(tmp_path))
