"""Vocabulary-blocked cross-entropy, accuracy and argmax against the plain [tokens, V] path.

Tolerance policy: fp32 values to 1e-6 relative and gradients to 1e-6 absolute (scaled to the
gradients' size) -- what reassociating the logsumexp and the dW / dh sums over blocks costs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, LlamaConfig, TransformerConfig
from calm_jax.models import losses
from calm_jax.models.autoencoder import Autoencoder

N, D, V = 40, 12, 300


def _problem(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (N, D))
  w = jax.random.normal(k[1], (V, D))
  labels = jax.random.randint(k[2], (N,), 0, V)
  # Labels in the last block, in the part of it the shifted last block re-reads, and at the ends.
  labels = labels.at[:4].set(jnp.array([V - 1, V - 70, 0, 255]))
  g = jax.random.uniform(k[3], (N,)) + 0.5   # a per-token cotangent, not just a mean
  return h, w, labels, g


def _plain(h, w_vd, labels, g):
  logits = h @ w_vd.T
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  return jnp.sum(g * nll)


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("block", [64, 100, 299])   # 300 = 4 x 64 + 44: the last block overlaps
def test_blocked_nll_matches_plain_values_and_gradients(layout, block):
  h, w, labels, g = _problem()
  w_in = w if layout == "vd" else w.T
  blocked = lambda h, w_in: jnp.sum(g * losses.blocked_token_nll(h, w_in, labels, block, layout)[0])
  v1, (dh1, dw1) = jax.value_and_grad(blocked, (0, 1))(h, w_in)
  v0, (dh0, dw0) = jax.value_and_grad(_plain, (0, 1))(h, w, labels, g)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  scale = float(jnp.max(jnp.abs(dw0)))
  np.testing.assert_allclose(dh1, dh0, rtol=0, atol=1e-6 * scale)
  np.testing.assert_allclose(dw1 if layout == "vd" else dw1.T, dw0, rtol=0, atol=1e-6 * scale)


def test_blocked_argmax_and_accuracy_take_the_first_maximum():
  h, w, labels, _ = _problem(1)
  # Ties across blocks: rows 7 and 250 (and 3 and 290, inside the overlapped last block) equal.
  w = w.at[250].set(w[7]).at[290].set(w[3])
  logits = h @ w.T
  want = jnp.argmax(logits, -1)
  h = h.at[0].set(w[7] * 10).at[1].set(w[3] * 10)   # rows whose maximum is a tie
  want = jnp.argmax(h @ w.T, -1)
  assert int(want[0]) == 7 and int(want[1]) == 3
  for block in (64, 100):
    np.testing.assert_array_equal(losses.blocked_argmax(h, w, block), want)
    np.testing.assert_array_equal(losses.blocked_argmax(h, w.T, block, "dv"), want)
    correct = losses.blocked_token_nll(h, w, want.at[2].set((want[2] + 1) % V), block)[1]
    assert float(jnp.sum(correct)) == N - 1 and float(correct[2]) == 0.0


def test_vocab_block_size_is_automatic_by_vocabulary():
  assert losses.vocab_block_size(8192, 2048) == 0          # benchmark configs: the plain path
  assert losses.vocab_block_size(1024, 2048) == 0
  c = losses.vocab_block_size(128257, 2048)
  assert 1024 <= c <= 16384 and c & (c - 1) == 0
  assert losses.vocab_block_size(128257, 2048 * 64) == 1024  # many rows: the smallest block
  with losses.vocab_blocks(0):
    assert losses.vocab_block_size(128257, 2048) == 0
  with losses.vocab_blocks(96):
    assert losses.vocab_block_size(1000, 10) == 96


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_autoencoder_loss_accuracy_and_decode_blocked_equal_plain():
  cfg = AutoencoderConfig(vocab_size=V, hidden_size=16, intermediate_size=32, latent_size=8, patch_size=4)
  params = models.init_params(cfg, jax.random.key(0))
  # A sharper decoder than at init, so that accuracy is not trivially 0.
  params["encoder"]["embed_tokens"]["embedding"] *= 40.0
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V)
  f = lambda p: models.autoencoder_loss_fn(cfg, p, tokens, jax.random.key(3))
  with losses.vocab_blocks(0):
    (v0, m0), g0 = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  with losses.vocab_blocks(64):
    (v1, m1), g1 = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  assert float(m1["token_acc"]) == float(m0["token_acc"])
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g0))
  assert _max_diff(g0, g1) <= 1e-6 * scale
  z = jax.random.normal(jax.random.key(4), (3, 4, 8))
  ae = Autoencoder(cfg)
  want = jax.jit(lambda p: jnp.argmax(ae.apply({"params": p}, z, method="decode"), -1))(params)
  with losses.vocab_blocks(64):
    got = jax.jit(lambda p: ae.apply({"params": p}, z, method="decode_argmax"))(params)
  np.testing.assert_array_equal(got, want)


def test_transformer_loss_blocked_equals_plain_with_mask():
  bb = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1)
  cfg = TransformerConfig(backbone=bb)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, V)
  mask = jnp.ones((2, 12), bool).at[0, :5].set(False)
  f = lambda p: models.transformer_loss_fn(cfg, p, tokens, None, mask)[0]
  with losses.vocab_blocks(0):
    v0, g0 = jax.jit(jax.value_and_grad(f))(params)
  with losses.vocab_blocks(100):
    v1, g1 = jax.jit(jax.value_and_grad(f))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g0))
  assert _max_diff(g0, g1) <= 1e-6 * scale
