"""The attention implementations (calm_jax.models.attention) against the plain path.

Tolerance policy: fp32, outputs to 1e-6 and gradients to 2e-6 relative to their largest entry
(the chunked path reassociates the softmax sums and, past one key block, rescales online).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import models
from calm_jax.configs import ConfigError, LlamaConfig, TransformerConfig
from calm_jax.models import attention
from calm_jax.models.backbone import init_cache
from calm_jax.models.transformer import TransformerLM

B, T, H, G, DH = 2, 37, 4, 2, 8     # GQA: two query heads per key/value head; T not a block multiple


def _qkv(t=T, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (B, t, H, DH)), jax.random.normal(k[1], (B, t, G, DH)),
          jax.random.normal(k[2], (B, t, G, DH)), jax.random.normal(k[3], (B, t, H, DH)))


def _close(a, b, rel):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=rel * float(jnp.max(jnp.abs(y))))


def _value_and_grads(fn, q, k, v, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), (0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("q_block,kv_block", [(16, 1024), (7, 5)])   # one key block / online softmax
def test_chunked_causal_matches_plain_forward_and_gradient(q_block, kv_block):
  q, k, v, w = _qkv()
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
  want = _value_and_grads(lambda q, k, v: attention.attend_xla(q, k, v, causal), q, k, v, w)
  got = _value_and_grads(lambda q, k, v: attention.attend_chunked(q, k, v, None, q_block, kv_block), q, k, v, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-5)
  _close(got[1], want[1], 2e-6)
  out = jax.jit(lambda q, k, v: attention.attend_chunked(q, k, v, None, q_block, kv_block))(q, k, v)
  _close(out, attention.attend_xla(q, k, v, causal), 1e-6)


def test_chunked_with_a_cache_mask_and_fully_masked_rows():
  q, k, v, w = _qkv()
  s = T
  valid = jnp.ones((B, s), bool).at[0, :6].set(False)          # left padding of row 0
  mask = (jnp.arange(s)[None, :] <= jnp.arange(T)[:, None])[None] & valid[:, None, :]
  want = _value_and_grads(lambda q, k, v: attention.attend_xla(q, k, v, mask), q, k, v, w)
  got = _value_and_grads(lambda q, k, v: attention.attend_chunked(q, k, v, mask, 8, 5), q, k, v, w)
  assert np.all(np.isfinite(got[0]))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-5)
  _close(got[1], want[1], 2e-6)


def test_auto_resolves_by_platform_dtype_and_cache():
  r = attention.resolve
  assert r("auto", "gpu", jnp.bfloat16, 512, False) == "cudnn"
  assert r("auto", "gpu", jnp.float32, 512, False) == "chunked"     # cuDNN has no fp32 flash kernel
  assert r("auto", "tpu", jnp.bfloat16, 512, False) == "splash"
  assert r("auto", "cpu", jnp.float32, 512, False) == "chunked"
  assert r("auto", "cpu", jnp.float32, 64, False) == "xla"          # short contexts: nothing to save
  assert r("auto", "gpu", jnp.bfloat16, 1, True) == "xla"           # decoding with a cache
  assert r("cudnn", "gpu", jnp.bfloat16, 512, True) == "chunked"
  assert r("xla", "gpu", jnp.bfloat16, 512, False) == "xla"


def test_splash_kernel_in_interpret_mode_matches_plain():
  t = 128                                                      # splash works in blocks of 128 rows
  q, k, v, _ = _qkv(t, 1)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (B, t, t))
  got = jax.jit(lambda q, k, v: attention.attend_splash(q, k, v, interpret=True))(q, k, v)
  _close(got, attention.attend_xla(q, k, v, causal), 1e-6)


def test_bad_attention_impl_names_the_field():
  with pytest.raises(ConfigError, match="attention_impl"):
    LlamaConfig(attention_impl="flash")


def test_transformer_chunked_equals_plain_including_the_kv_cache(monkeypatch):
  monkeypatch.setattr(attention, "Q_BLOCK", 4)
  monkeypatch.setattr(attention, "KV_BLOCK", 4)
  monkeypatch.setattr(attention, "CHUNK_MIN_T", 4)
  bb = dict(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)
  cfgs = {impl: TransformerConfig(backbone=LlamaConfig(attention_impl=impl, **bb)) for impl in ("xla", "auto")}
  params = models.init_params(cfgs["xla"], jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 11), 0, 31)
  loss = {i: jax.jit(jax.value_and_grad(lambda p, c=c: models.transformer_loss_fn(c, p, toks)[0]))(params)
          for i, c in cfgs.items()}
  np.testing.assert_allclose(loss["auto"][0], loss["xla"][0], rtol=1e-6)
  _close(loss["auto"][1], loss["xla"][1], 2e-6)
  full = jax.jit(lambda p: TransformerLM(cfgs["xla"]).apply({"params": p}, toks)[0])(params)

  @jax.jit
  def cached(p):   # a 6-token prefill (chunked with the cache mask), then single steps (xla)
    m = TransformerLM(cfgs["auto"])
    cache = init_cache(cfgs["auto"].backbone, 2, 12)
    outs = []
    for lo, hi in ((0, 6),) + tuple((i, i + 1) for i in range(6, 11)):
      o, cache = m.apply({"params": p}, toks[:, lo:hi], cache=cache)
      outs.append(o)
    return jnp.concatenate(outs, 1)

  np.testing.assert_allclose(cached(params), full, atol=2e-5)
