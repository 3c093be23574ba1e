"""The energy score, the clipped KL and the autoencoder loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.configs import AutoencoderConfig, ConfigError
from calm_jax.models import losses

# Jitted: eager JAX compiles every operation of the loss separately (slow on a loaded CPU).
energy_score = jax.jit(losses.energy_score, static_argnums=(2, 3), static_argnames=("beta", "pairwise"))
energy_loss = jax.jit(losses.energy_loss, static_argnums=(2, 4), static_argnames=("beta", "pairwise"))


def _e_abs_normal(mu, s):
  """E|Z| for Z ~ N(mu, s^2)."""
  return s * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * s * s)) + mu * math.erf(mu / (s * math.sqrt(2)))


def test_energy_score_is_unbiased_against_closed_form():
  # 1-D Gaussians: E S = E|X-X'| - 2 E|X-Y| has a closed form.  The training
  # estimator (N=8 model samples, M=100 targets per position), averaged over
  # many positions, must match it.
  mu_p, s_p, mu_q, s_q = 0.3, 1.2, -0.4, 0.7
  n, m, p = 8, 100, 20000
  kx, ky = jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31))
  x = mu_p + s_p * jax.random.normal(kx, (n, p, 1))
  y = mu_q + s_q * jax.random.normal(ky, (m, p, 1))
  scores = np.asarray(energy_score(x, y))
  exact = _e_abs_normal(0.0, math.sqrt(2) * s_p) - 2 * _e_abs_normal(mu_p - mu_q, math.hypot(s_p, s_q))
  se = scores.std() / math.sqrt(p)
  assert abs(scores.mean() - exact) < 5 * se, (scores.mean(), exact, se)


def test_energy_score_is_strictly_proper():
  # In expectation the loss is lowest when the model's distribution equals the target's.
  key = jax.random.key(np.random.SeedSequence().entropy % 2**31)
  p, dim = 4000, 3
  ky, *kx = jax.random.split(key, 6)
  y = jax.random.normal(ky, (100, p, dim))
  candidates = {"match": (0.0, 1.0), "shift": (0.4, 1.0), "wide": (0.0, 1.4), "narrow": (0.0, 0.6),
                "point": (0.0, 0.0)}
  loss = {}
  for (name, (mu, s)), k in zip(candidates.items(), kx):
    x = mu + s * jax.random.normal(k, (8, p, dim))
    per_pos = -np.asarray(energy_score(x, y))
    loss[name] = (per_pos.mean(), per_pos.std() / math.sqrt(p))
  best, best_se = loss["match"]
  for name, (v, se) in loss.items():
    if name != "match":
      assert v > best + 3 * math.hypot(se, best_se), (name, loss)


def test_no_nan_gradient_at_zero_distance():
  # Identical model samples (e.g. the zero-initialised head at step 0): the
  # pairwise distances are exactly 0 and the gradient must stay finite.
  x = jnp.zeros((8, 5, 4))
  y = jax.random.normal(jax.random.key(0), (100, 5, 4))
  for pairwise in ("diff", "gram"):
    g = jax.jit(jax.grad(lambda a: losses.energy_loss(a, y, pairwise=pairwise)))(x)
    assert bool(jnp.all(jnp.isfinite(g)))
  # and with a target sample coinciding with a model sample
  y0 = y.at[0].set(0.0)
  g = jax.jit(jax.grad(lambda a: losses.energy_loss(a, y0, beta=1.5)))(x)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_gram_and_diff_agree():
  k1, k2 = jax.random.split(jax.random.key(3))
  x = jax.random.normal(k1, (8, 7, 16)) * 2 + 1
  y = jax.random.normal(k2, (100, 7, 16)) + 1
  for beta in (0.5, 1.0, 1.5):
    np.testing.assert_allclose(energy_score(x, y, beta, "gram"), energy_score(x, y, beta, "diff"),
                               rtol=1e-5)


def test_energy_score_matches_definition_small():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(3, 2, 4)), rng.normal(size=(5, 2, 4))
  beta = 1.3
  want = []
  for p in range(2):
    dxx = np.mean([np.linalg.norm(x[i, p] - x[j, p]) ** beta for i in range(3) for j in range(3) if i != j])
    dxy = np.mean([np.linalg.norm(x[i, p] - y[m, p]) ** beta for i in range(3) for m in range(5)])
    want.append(dxx - 2 * dxy)
  np.testing.assert_allclose(energy_score(jnp.asarray(x), jnp.asarray(y), beta), want, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 2.0, -1.0, 2.5])
def test_beta_outside_open_interval_is_refused(beta):
  with pytest.raises(ConfigError, match=r"\(0, 2\)"):
    losses.energy_score(jnp.ones((2, 1, 2)), jnp.ones((3, 1, 2)), beta)


def test_energy_loss_mask():
  rng = np.random.default_rng(1)
  x, y = jnp.asarray(rng.normal(size=(4, 6, 3))), jnp.asarray(rng.normal(size=(9, 6, 3)))
  mask = jnp.array([1, 1, 0, 1, 0, 0], bool)
  per = -energy_score(x, y)
  np.testing.assert_allclose(energy_loss(x, y, mask_P=mask), per[mask].mean(), rtol=1e-6)


def test_kl_clamp_floor_and_gradient():
  mean = jnp.array([[0.0, 2.0, 0.1]])
  log_std = jnp.array([[0.0, 0.0, -0.05]])
  raw = losses.kl_per_dim(mean, log_std)
  np.testing.assert_allclose(raw[0, 1], 0.5 * 4.0, rtol=1e-6)
  # dims 0 and 2 are under the 0.5 floor: they count 0.5 and get no gradient
  assert float(raw[0, 0]) < 0.5 and float(raw[0, 2]) < 0.5
  np.testing.assert_allclose(losses.clamped_kl(mean, log_std, 0.5), 0.5 + 2.0 + 0.5, rtol=1e-6)
  g = jax.grad(lambda m: losses.clamped_kl(m, log_std, 0.5))(mean)
  np.testing.assert_allclose(g, [[0.0, 2.0, 0.0]], atol=1e-6)
  # the KL term is never below latent_size * clamp
  assert float(losses.clamped_kl(jnp.zeros((4, 8)), jnp.zeros((4, 8)), 0.5)) == pytest.approx(4.0)


def test_autoencoder_loss_combines_as_reference():
  cfg = AutoencoderConfig(vocab_size=11, hidden_size=8, intermediate_size=8, latent_size=4, patch_size=4)
  rng = np.random.default_rng(2)
  out = {"logits": jnp.asarray(rng.normal(size=(2, 3, 4, 11)), jnp.float32),
         "mean": jnp.asarray(rng.normal(size=(2, 3, 4))), "log_std": jnp.asarray(rng.normal(size=(2, 3, 4)) * 0.1)}
  labels = jnp.asarray(rng.integers(0, 11, (2, 12)))
  train_loss, m = losses.autoencoder_loss(out, labels, cfg, train=True)
  logp = jax.nn.log_softmax(out["logits"].reshape(-1, 11))
  ce = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(labels).reshape(-1, 1), 1))
  kl = np.mean(np.sum(np.maximum(np.asarray(losses.kl_per_dim(out["mean"], out["log_std"])), 0.5), -1))
  np.testing.assert_allclose(train_loss, 4 * ce + 1e-3 * kl, rtol=1e-5)
  eval_loss, _ = losses.autoencoder_loss(out, labels, cfg, train=False)
  np.testing.assert_allclose(eval_loss, ce, rtol=1e-5)
  assert 0.0 <= float(m["token_acc"]) <= 1.0


@pytest.mark.parametrize("scale", [1.0, 60.0])   # 60: logits far outside exp's fp32 range without the max shift
def test_cross_entropy_value_and_gradient_match_autodiff_of_log_softmax(scale):
  """token_nll's own VJP (softmax - onehot, no scatter) == autodiff of log_softmax + gather,
  with a mask, under jit, for a bf16 input as well."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(3, 5, 37)) * scale, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 37, (3, 5)))
  mask = jnp.asarray(rng.random((3, 5)) > 0.3)
  weights = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)   # a non-uniform upstream gradient

  def plain_nll(x):
    return -jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32)), labels[..., None], -1)[..., 0]

  pairs = [  # (ours, autodiff's), each a scalar function of the logits
      (lambda x: jnp.sum(losses.token_nll(x.astype(jnp.float32), labels) * weights),
       lambda x: jnp.sum(plain_nll(x) * weights)),
      (lambda x: losses.token_cross_entropy(x, labels, mask),
       lambda x: jnp.sum(plain_nll(x) * mask) / jnp.sum(mask)),
      (lambda x: losses.token_cross_entropy(x, labels), lambda x: jnp.mean(plain_nll(x)))]
  for x in (logits, logits.astype(jnp.bfloat16)):
    for ours, theirs in pairs:
      want_v, want_g = jax.jit(jax.value_and_grad(theirs))(x)
      got_v, got_g = jax.jit(jax.value_and_grad(ours))(x)
      assert got_g.dtype == x.dtype
      np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(got_g, np.float32), np.asarray(want_g, np.float32), rtol=1e-4, atol=1e-6)
  # Unmasked mean == the textbook definition.
  p = np.exp(np.asarray(logits, np.float64) - np.max(np.asarray(logits, np.float64), -1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -np.mean(np.log(np.take_along_axis(p, np.asarray(labels)[..., None], -1)))
  np.testing.assert_allclose(losses.token_cross_entropy(logits, labels), want, rtol=1e-5)
