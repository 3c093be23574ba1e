"""XLA's cost analysis of the compiled/lowered steps against the analytic counts (calm_jax.cost.xla_cost).

Tiny configs with every dimension distinct.  The traced matmuls must equal the
analytic matmul count exactly (same formulas, adjusted to the compiled
program); XLA's total within ``xla_cost.TOLERANCE`` (docs/FLOPS.md, "XLA
cross-check").  Train steps are counted on the lowered module (no backend
compile: seconds, not minutes, on 2 shared cores); the decode steps and, as a
slow test, CALM's train step on the compiled executable.
"""

import pytest

from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.cost import xla_cost

_BB = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
_TF = TransformerConfig(backbone=_BB)
_AE = AutoencoderConfig(vocab_size=64, hidden_size=24, intermediate_size=48, latent_size=8, patch_size=4)
_EN = EnergyConfig(backbone=_BB, patch_size=4, latent_size=8, noise_size=8, num_mlp_layers=2, num_samples=4,
                   num_target_samples=16)
_CASES = {"transformer": (_TF, None), "autoencoder": (_AE, None), "energy": (_EN, _AE)}


def _assert_close(c):
  assert c.matmul == pytest.approx(c.expected.matmul, rel=1e-9), (c.name, c.expected.matmul_parts)
  assert abs(c.residual) <= xla_cost.TOLERANCE, xla_cost.format_checks([c])


@pytest.mark.parametrize("kind", list(_CASES))
def test_train_step_lowered(kind):
  cfg, ae = _CASES[kind]
  _assert_close(xla_cost.check_train(kind, cfg, ae, batch=2, seq=32, compiled=False))


@pytest.mark.parametrize("kind", ["transformer", "energy"])
def test_decode_step_compiled(kind):
  cfg, ae = _CASES[kind]
  _assert_close(xla_cost.check_decode(kind, cfg, ae, batch=2, capacity=16, compiled=True))


def test_attention_grows_with_context():
  # The decode count must see the cache capacity: 4 more layers' worth of scores per extra slot.
  a = xla_cost.check_decode("transformer", _TF, batch=1, capacity=16, compiled=False)
  b = xla_cost.check_decode("transformer", _TF, batch=1, capacity=32, compiled=False)
  per_slot = 4 * _BB.num_hidden_layers * _BB.num_attention_heads * _BB.head_dim
  assert b.matmul - a.matmul == pytest.approx(16 * per_slot)


@pytest.mark.slow
def test_calm_train_step_compiled():
  # XLA:CPU duplicates cheap elementwise producers into each consuming fusion; on CALM's head
  # that adds ~12% over the lowered count (docs/FLOPS.md).  Matmuls stay exact.
  c = xla_cost.check_train("energy", _EN, _AE, batch=2, seq=32, compiled=True)
  assert c.matmul == pytest.approx(c.expected.matmul, rel=1e-9)
  assert abs(c.residual) <= xla_cost.COMPILED_TOLERANCE, xla_cost.format_checks([c])
