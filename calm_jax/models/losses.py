"""Losses: the autoencoder's clipped-KL VAE loss, CALM's energy loss, and cross-entropy.

Dimension legend: B batch, T tokens, S chunks, K tokens per chunk, V vocabulary,
L latent, P positions (any flattened leading axes), N model samples, M target
samples.

Everything is computed in fp32 whatever the compute dtype of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from calm_jax.configs import AutoencoderConfig, check_beta

# --------------------------------------------------------------------------- autoencoder


def kl_per_dim(mean, log_std):
  """KL(N(mean, sigma^2) || N(0, 1)) per latent dimension, with sigma = exp(log_std)."""
  mean = mean.astype(jnp.float32)
  log_std = log_std.astype(jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(2.0 * log_std) - 1.0 - 2.0 * log_std)


def clamped_kl(mean_xL, log_std_xL, kl_clamp: float):
  """Free-bits KL: each dimension's KL clamped from below at ``kl_clamp``,
  summed over the latent and averaged over chunks.  A dimension under the clamp
  gets no KL gradient, so the posterior is not pushed onto the prior (the naive
  VAE collapsed 71 of 128 dimensions in the paper)."""
  kl = jnp.maximum(kl_per_dim(mean_xL, log_std_xL), kl_clamp)
  return jnp.mean(jnp.sum(kl, axis=-1))


@jax.custom_vjp
def token_nll(logits_xV, labels_x):
  """Per-token ``-log softmax(logits)[label]`` (``logits`` in fp32).

  Its own VJP because autodiff's is wasteful at a vocabulary's width: the gradient
  of the label pick (a gather) is a scatter into a zero-filled ``[tokens, V]``
  array -- two extra passes over the largest array of a step, and a serial loop
  on the CPU.  Here the backward pass is the one elementwise pass
  ``g * (softmax - onehot)``, the one-hot formed by comparing against an iota
  inside it; the forward keeps the normalised exponentials it needs.
  """
  return _token_nll_fwd(logits_xV, labels_x)[0]


def _token_nll_fwd(logits_xV, labels_x):
  top = jax.lax.stop_gradient(jnp.max(logits_xV, axis=-1, keepdims=True))
  exp_xV = jnp.exp(logits_xV - top)
  total = jnp.sum(exp_xV, axis=-1, keepdims=True)
  picked = jnp.take_along_axis(logits_xV, labels_x[..., None], axis=-1)
  nll = (top + jnp.log(total) - picked)[..., 0]
  return nll, (exp_xV, total, labels_x)


def _token_nll_bwd(res, g_x):
  exp_xV, total, labels_x = res
  is_label = jnp.arange(exp_xV.shape[-1], dtype=labels_x.dtype) == labels_x[..., None]
  d_xV = g_x[..., None] * (exp_xV / total - is_label.astype(exp_xV.dtype))
  return d_xV, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def token_cross_entropy(logits_xV, labels_x, mask_x=None):
  """Mean cross-entropy over (masked) tokens, in fp32."""
  nll = token_nll(logits_xV.astype(jnp.float32), labels_x)
  if mask_x is None:
    return jnp.mean(nll)
  mask = mask_x.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def autoencoder_loss(outputs, labels_BxT, cfg: AutoencoderConfig, train: bool = True):
  """The reference's AE objective.

  ``outputs`` is the dict returned by :class:`calm_jax.models.autoencoder.Autoencoder`.
  Training: ``K * mean CE + kl_weight * clamped KL`` (K * token-mean CE is the
  per-chunk sum of Eq. 1).  Evaluation: the plain mean CE, as the reference.
  Returns ``(loss, metrics)``.
  """
  logits = outputs["logits"]
  v = logits.shape[-1]
  ce = token_cross_entropy(logits.reshape(-1, v), labels_BxT.reshape(-1))
  kl = clamped_kl(outputs["mean"], outputs["log_std"], cfg.kl_clamp)
  acc = jnp.mean((jnp.argmax(logits, -1).reshape(labels_BxT.shape) == labels_BxT).astype(jnp.float32))
  loss = ce * cfg.patch_size + cfg.kl_weight * kl if train else ce
  return loss, {"loss": loss, "ce": ce, "kl": kl, "token_acc": acc}


# --------------------------------------------------------------------------- energy score


def _safe_pow_norm(sq_dist, beta: float):
  """``||.||^beta`` from squared distances with a zero (not NaN) gradient at 0.

  ``sqrt`` has an infinite derivative at 0, which turns into NaN through the
  chain rule; the diagonal of the model-sample distance matrix is exactly 0.
  The double ``where`` keeps both the value and the gradient finite there
  (torch's norm returns a zero subgradient at 0, which this matches).
  """
  pos = sq_dist > 0
  safe = jnp.where(pos, sq_dist, 1.0)
  return jnp.where(pos, safe ** (0.5 * beta), 0.0)


def pairwise_sq_dist_diff(a_AxPxL, b_BxPxL):
  """Exact squared distances ``[A, B, P]`` via explicit differences (memory A*B*P*L)."""
  d = a_AxPxL[:, None] - b_BxPxL[None]
  return jnp.sum(d * d, axis=-1)


def pairwise_sq_dist_gram(a_AxPxL, b_BxPxL):
  """Squared distances ``[A, B, P]`` via ``|a|^2 + |b|^2 - 2 a.b`` (memory A*B*P)."""
  aa = jnp.sum(a_AxPxL * a_AxPxL, axis=-1)
  bb = jnp.sum(b_BxPxL * b_BxPxL, axis=-1)
  ab = jnp.einsum("apl,bpl->abp", a_AxPxL, b_BxPxL, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(aa[:, None] + bb[None] - 2.0 * ab, 0.0)


def energy_score(x_NxPxL, y_MxPxL, beta: float = 1.0, pairwise: str = "diff"):
  """Monte Carlo energy score per position, ``[P]`` (higher is better).

  ``score = mean_{i != j} ||x_i - x_j||^beta - 2 mean_{i, m} ||x_i - y_m||^beta``
  with x the N model samples and y the M target samples.  Unbiased for
  ``E||X - X'||^beta - 2 E||X - Y||^beta``; strictly proper for beta in (0, 2).

  ``pairwise``: 'diff' (exact differences) or 'gram' (inner products; far less
  memory for large M, agrees to ~1e-6 relative in fp32).
  """
  check_beta(beta)
  x = x_NxPxL.astype(jnp.float32)
  y = jax.lax.stop_gradient(y_MxPxL.astype(jnp.float32))
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"energy_score needs at least 2 model samples per position, got {n}")
  # N x N is tiny: exact differences keep the diagonal exactly zero.
  dxx = _safe_pow_norm(pairwise_sq_dist_diff(x, x), beta)
  dist_fn = {"diff": pairwise_sq_dist_diff, "gram": pairwise_sq_dist_gram}[pairwise]
  dxy = _safe_pow_norm(dist_fn(x, y), beta)
  return jnp.sum(dxx, axis=(0, 1)) / (n * (n - 1)) - 2.0 * jnp.mean(dxy, axis=(0, 1))


def posterior_samples(key, mean_PxL, log_std_PxL, num: int):
  """``num`` samples of the frozen autoencoder's posterior, ``[num, P, L]``, no gradient."""
  mean = jax.lax.stop_gradient(mean_PxL.astype(jnp.float32))
  std = jnp.exp(jax.lax.stop_gradient(log_std_PxL.astype(jnp.float32)))
  return mean[None] + std[None] * jax.random.normal(key, (num,) + mean.shape, jnp.float32)


def energy_loss(x_NxPxL, y_MxPxL, beta: float = 1.0, mask_P=None, pairwise: str = "diff"):
  """``-energy_score`` averaged over (masked) positions."""
  neg = -energy_score(x_NxPxL, y_MxPxL, beta, pairwise)
  if mask_P is None:
    return jnp.mean(neg)
  m = mask_P.astype(jnp.float32)
  return jnp.sum(neg * m) / jnp.maximum(jnp.sum(m), 1.0)


def energy_distance_gaussians(mu1, sigma1, mu2, sigma2, dim: int, num: int, key):
  """Helper for tests: Monte Carlo of the energy distance between isotropic Gaussians."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x = mu1 + sigma1 * jax.random.normal(k1, (num, dim))
  x2 = mu1 + sigma1 * jax.random.normal(k2, (num, dim))
  y = mu2 + sigma2 * jax.random.normal(k3, (num, dim))
  y2 = mu2 + sigma2 * jax.random.normal(k4, (num, dim))
  n = lambda a: jnp.linalg.norm(a, axis=-1)
  return 2 * jnp.mean(n(x - y)) - jnp.mean(n(x - x2)) - jnp.mean(n(y - y2))


# --------------------------------------------------------------------------- discrete baseline


def next_token_loss(logits_BxTxV, tokens_BxT, mask_BxT=None):
  """Next-token cross-entropy: logits at t predict token t+1."""
  mask = None if mask_BxT is None else mask_BxT[:, 1:]
  return token_cross_entropy(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], mask)
