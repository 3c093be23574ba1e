"""Mixed precision as the reference trains (torch autocast bf16): fp32 master weights, bf16 matmuls,
fp32 norms' statistics, softmax, energy score and losses.

Written tolerance: on these tiny models (perturbed parameters, width 32) a bf16-compute loss is
within 2 % of the fp32 loss, and its gradient has cosine similarity >= 0.99 with the fp32
gradient (leaves concatenated) -- bf16's 8-bit mantissa gives ~0.4 % per rounding, and the sums
over a few dozen terms stay well inside that bound.  That bound alone would not see a loss, a
softmax or a norm computed in bf16 at these sizes (an energy score in bf16 passes it), so a second
test reads the program: every exp / log / rsqrt / pow of a bf16 loss and its gradient is fp32.
The autoencoder is compared on its deterministic path (no key): with a key its posterior noise is
drawn in the compute dtype, other numbers in bf16 than in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.models import losses

V = 64
LOSS_RTOL, GRAD_COS = 2e-2, 0.99


def _bb(dtype):
  return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, dtype=dtype)


def _cfgs(dtype):
  ae = AutoencoderConfig(vocab_size=V, hidden_size=32, intermediate_size=48, latent_size=8, patch_size=4,
                         dtype=dtype)
  en = EnergyConfig(backbone=_bb(dtype), patch_size=4, latent_size=8, noise_size=6, num_mlp_layers=1,
                    num_samples=4, num_target_samples=16)
  return ae, en, TransformerConfig(backbone=_bb(dtype))


def _perturbed(p, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), p)


def _flat(g):
  return jnp.concatenate([x.astype(jnp.float32).reshape(-1) for x in jax.tree.leaves(g)])


def _loss_fns(dtype):
  ae, en, tr = _cfgs(dtype)
  key = jax.random.key(7)
  return {
      "autoencoder": (ae, lambda p, a, t: models.autoencoder_loss_fn(ae, p, t, None, train=False)[0]),
      "energy": (en, lambda p, a, t: models.energy_loss_fn(en, _cfgs(dtype)[0], p, a, t, key)[0]),
      "transformer": (tr, lambda p, a, t: models.transformer_loss_fn(tr, p, t)[0]),
  }


@pytest.mark.parametrize("kind", ["energy", "transformer"])   # the AE's program: the test below
def test_bf16_compute_is_bounded_by_fp32(kind):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)
  fp32_cfg, f32 = _loss_fns("float32")[kind]
  _, b16 = _loss_fns("bfloat16")[kind]
  params = _perturbed(models.init_params(fp32_cfg, jax.random.key(0)), 0)
  ae_params = _perturbed(models.init_params(_cfgs("float32")[0], jax.random.key(1)), 1)
  l32, g32 = jax.jit(jax.value_and_grad(f32))(params, ae_params, tokens)
  l16, g16 = jax.jit(jax.value_and_grad(b16))(params, ae_params, tokens)
  assert l16.dtype == jnp.float32                                   # losses in fp32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16))  # fp32 master weights and gradients
  np.testing.assert_allclose(l16, l32, rtol=LOSS_RTOL)
  a, b = _flat(g16), _flat(g32)
  assert float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) >= GRAD_COS
  assert float(jnp.max(jnp.abs(l16 - l32))) > 0                     # bf16 did run: not the fp32 program


def test_blocked_cross_entropy_in_bf16_is_bounded_by_fp32():
  k = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k[0], (48, 16))
  w = jax.random.normal(k[1], (300, 16)) * 0.5
  labels = jax.random.randint(k[2], (48,), 0, 300)
  f = lambda h, w: jnp.mean(losses.blocked_token_nll(h, w, labels, 64)[0])
  l32, g32 = jax.value_and_grad(f, (0, 1))(h, w)
  l16, g16 = jax.value_and_grad(f, (0, 1))(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert l16.dtype == jnp.float32 and g16[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(l16, l32, rtol=LOSS_RTOL)
  a, b = _flat(g16), _flat(g32)
  assert float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) >= GRAD_COS


_FP32_ONLY = {"exp", "log", "log1p", "rsqrt", "sqrt", "pow", "reduce_max", "logistic_fp32_never"}


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


@pytest.mark.parametrize("kind", ["autoencoder", "energy", "transformer"])
def test_bf16_losses_norms_and_softmax_run_in_fp32(kind):
  """Every exp / log / rsqrt / sqrt / pow / max-reduction of a bf16-compute loss and its gradient --
  softmax, norms' statistics, the energy score's distances, the cross-entropy -- takes fp32 inputs."""
  cfg, fn = _loss_fns("bfloat16")[kind]
  params = models.abstract_params(cfg)
  ae_params = models.abstract_params(_cfgs("bfloat16")[0])
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(params, ae_params, tokens).jaxpr
  low = sorted({f"{e.primitive.name}:{v.aval.dtype}" for e in _eqns(jaxpr) if e.primitive.name in _FP32_ONLY
                for v in e.invars if hasattr(v, "aval") and v.aval.dtype != jnp.float32})
  assert not low, f"{kind}: ops outside fp32 in a bf16 loss: {low}"
