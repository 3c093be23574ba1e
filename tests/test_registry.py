"""Every registry experiment validates and builds abstractly; the paper's sizes; errors name fields."""

import jax
import pytest

from calm_jax import models
from calm_jax.configs import ConfigError
from calm_jax.training import train
from experiments import registry


@pytest.mark.parametrize("name", list(registry.EXPERIMENTS))
def test_every_experiment_builds_abstractly(name):
  exp = train.resolve(registry.get_config(name), check_paths=False)
  shapes = models.abstract_params(exp.model)   # jax.eval_shape: nothing allocated
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert models.count_params(shapes) > 0


@pytest.mark.parametrize("name, paper", [("ae_k4", 75e6), ("transformer_s", 281e6), ("calm_m", 371e6)])
def test_paper_sizes(name, paper):
  exp = train.resolve(registry.get_config(name), check_paths=False)
  n = models.count_params(models.abstract_params(exp.model))   # CALM: without the autoencoder
  assert exp.vocab_size == 128257
  # The paper truncates (281.96M -> 281M); allow 1.5% above, nothing below.
  assert paper <= n <= paper * 1.015, n


def _bad(name, **edits):
  c = registry.get_config(name)
  with c.unlocked():
    for path, value in edits.items():
      node = c
      *parents, leaf = path.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


@pytest.mark.parametrize("name, edits, field", [
    ("ae_tiny", {"data.block_length": 66}, "data.block_length"),
    ("calm_tiny", {"model.backbone.num_attention_heads": 3}, "model.backbone.num_attention_heads"),
    ("transformer_tiny", {"model.backbone.num_key_value_heads": 3}, "model.backbone.num_key_value_heads"),
    ("calm_tiny", {"model.backbone.hiden_size": 3}, "model.backbone.hiden_size"),
    ("ae_tiny", {"train.stepz": 3}, "train.stepz"),
    ("ae_tiny", {"optim.warmup_steps": 10}, "optim.warmup_steps"),
    ("calm_tiny", {"ae_workdir": ""}, "ae_workdir"),
])
def test_validation_names_the_field(name, edits, field):
  with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}:"):
    train.resolve(_bad(name, **edits))


def test_latent_size_must_match_the_autoencoder(tmp_path):
  ae = registry.get_config("ae_tiny")
  (tmp_path / "config.json").write_text(__import__("json").dumps(ae.to_dict()))
  c = _bad("calm_tiny", ae_workdir=str(tmp_path), **{"model.latent_size": 64})
  with pytest.raises(ConfigError, match=r"^model\.latent_size: 64, but the autoencoder"):
    train.resolve(c)


def test_locked_config_rejects_unknown_override():
  c = registry.get_config("calm_tiny")
  with pytest.raises(AttributeError, match="patch_sise"):
    c.model.patch_sise = 8


def test_get_config_args():
  from experiments import autoencoder, calm
  assert autoencoder.get_config("K=8").model.latent_size == 256
  assert calm.get_config("size=L,K=2").model.latent_size == 64
  with pytest.raises(ValueError, match="'Q'"):
    calm.get_config("Q=1")
