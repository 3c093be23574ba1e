"""Losses: the autoencoder's clipped-KL VAE loss, CALM's energy loss, and cross-entropy.

Dimension legend: B batch, T tokens, S chunks, K tokens per chunk, V vocabulary,
L latent, P positions (any flattened leading axes), N model samples, M target
samples.

Everything is computed in fp32 whatever the compute dtype of the model.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from calm_jax.configs import AutoencoderConfig, check_beta
from calm_jax.models import layers, rng
from calm_jax.parallel import sharding

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


# --------------------------------------------------------------------------- large vocabularies
#
# Cross-entropy, accuracy and argmax through an output projection, in vocabulary blocks: the
# [tokens, V] logits are never in memory at once (the "blockwise" or "cut" cross-entropy).  At
# Llama-3's V = 128,257 one fp32 copy of them is 1 GB per 2048 tokens, and a plain train step holds
# several (logits, exponentials, their cotangent).  Here a loop over blocks of ``c`` vocabulary rows
# of the projection computes each block's logits, folds them into a running logsumexp (and max /
# argmax, and picks the label's logit from the block that holds it); the VJP recomputes the block
# logits from the saved logsumexp and accumulates ``dh`` and ``dW`` block by block.  Same values as
# the plain path to fp32 reassociation (tested to 1e-6).  Costs one more pass of the projection's
# GEMM than the plain path (the recomputation), and saves every [tokens, V] pass over memory.

VOCAB_CHUNK_MIN = 32_768     # V above which losses and argmax decodes run in vocabulary blocks
VOCAB_BLOCK_ELEMS = 1 << 23  # target rows x block width of one block's logits (32 MB in fp32)
VOCAB_BLOCK_RANGE = (1024, 16_384)
_FORCED_BLOCK = [None]        # set by vocab_blocks(): tests and benchmarks force a block size


@contextlib.contextmanager
def vocab_blocks(block: int | None):
  """Within the context, every vocabulary-blocked op uses ``block`` columns per block (0: the
  plain path, whatever V; None: the automatic choice).  Read at trace time."""
  _FORCED_BLOCK[0], prev = block, _FORCED_BLOCK[0]
  try:
    yield
  finally:
    _FORCED_BLOCK[0] = prev


def vocab_block_size(v: int, rows: int) -> int:
  """Block width for a projection onto ``v`` classes from ``rows`` rows; 0 means unblocked.

  Automatic: unblocked up to ``VOCAB_CHUNK_MIN`` (the benchmark configs' V = 8192 and the tiny
  vocabularies keep exactly today's path); above it, a power of two with about
  ``VOCAB_BLOCK_ELEMS`` logits per block, within ``VOCAB_BLOCK_RANGE``.
  """
  forced = _FORCED_BLOCK[0]
  if forced is not None:
    return 0 if forced <= 0 or forced >= v else int(forced)
  if v <= VOCAB_CHUNK_MIN:
    return 0
  c = 1 << max(0, (VOCAB_BLOCK_ELEMS // max(rows, 1)).bit_length() - 1)
  return int(min(max(c, VOCAB_BLOCK_RANGE[0]), VOCAB_BLOCK_RANGE[1], v))


def _w_block(w, start, c: int, layout: str):
  """Block ``[start, start + c)`` of the projection: ``[c, D]`` rows of a ``[V, D]`` embedding
  (layout 'vd') or ``[D, c]`` columns of a ``[D, V]`` kernel (layout 'dv')."""
  return jax.lax.dynamic_slice_in_dim(w, start, c, axis=0 if layout == "vd" else 1)


def _block_logits(h_NxD, w_blk, layout: str):
  dims = (((1,), (1,)), ((), ())) if layout == "vd" else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(h_NxD, w_blk, dims, preferred_element_type=jnp.float32)


def _block_starts(v: int, c: int, i):
  """Start of block i and the first column it owns.  The last block is shifted back to end at V
  (no padded copy of the projection); its columns below ``own`` belong to the previous block and
  are masked out."""
  own = i * c
  return jnp.minimum(own, v - c), own


def _scan_blocks(h_NxD, w, labels_N, c: int, layout: str):
  """One pass over the vocabulary: per row logsumexp, label logit and argmax (first maximum)."""
  v = w.shape[0] if layout == "vd" else w.shape[1]
  n = h_NxD.shape[0]
  iota = jnp.arange(c, dtype=jnp.int32)

  def body(i, carry):
    m, s, picked, best, arg = carry
    start, own = _block_starts(v, c, i)
    cols = start + iota
    logits = _block_logits(h_NxD, _w_block(w, start, c, layout), layout)
    owned = cols >= own
    logits = jnp.where(owned, logits, -jnp.inf)
    bm = jnp.max(logits, axis=-1)
    m_new = jnp.maximum(m, bm)
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
    if labels_N is not None:
      is_label = owned & (cols == labels_N[:, None])
      picked = picked + jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)
    barg = start + jnp.argmax(logits, axis=-1).astype(jnp.int32)
    arg = jnp.where(bm > best, barg, arg)          # strictly greater: the first maximum wins
    return m_new, s, picked, jnp.maximum(best, bm), arg

  f32 = jnp.float32
  init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32),
          jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), jnp.int32))
  m, s, picked, _, arg = jax.lax.fori_loop(0, -(-v // c), body, init)
  return m + jnp.log(s), picked, arg


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocked_token_nll(h_NxD, w, labels_N, block: int, layout: str = "vd"):
  """``(nll_N, correct_N)`` of ``softmax(h @ W)`` without the ``[N, V]`` logits in memory.

  ``w``: the ``[V, D]`` (tied) embedding with ``layout='vd'``, or a ``[D, V]`` LM-head kernel with
  ``layout='dv'``; ``block``: vocabulary columns per block (static).  ``nll`` = logsumexp - label
  logit in fp32; ``correct`` = 1.0 where the (first) argmax equals the label, no gradient.
  Operands in any float dtype; block logits are accumulated in fp32.  Gradients flow to ``h`` and
  ``w`` only, through a VJP that recomputes each block's logits.
  """
  lse, picked, arg = _scan_blocks(h_NxD, w, labels_N, block, layout)
  return lse - picked, (arg == labels_N).astype(jnp.float32)


def _blocked_fwd(h_NxD, w, labels_N, block, layout):
  lse, picked, arg = _scan_blocks(h_NxD, w, labels_N, block, layout)
  return (lse - picked, (arg == labels_N).astype(jnp.float32)), (h_NxD, w, labels_N, lse)


def _blocked_bwd(block, layout, res, cts):
  h_NxD, w, labels_N, lse = res
  g_N = cts[0].astype(jnp.float32)
  c = block
  v = w.shape[0] if layout == "vd" else w.shape[1]
  iota = jnp.arange(c, dtype=jnp.int32)
  # dW's block product contracts the N rows: as [D, N] @ [N, c] with the small h transposed once
  # (see layers.tied_logits for why XLA:CPU wants it this way round).
  h_DxN = jax.lax.optimization_barrier(h_NxD.T)

  def body(i, carry):
    dh, dw = carry
    start, own = _block_starts(v, c, i)
    cols = start + iota
    w_blk = _w_block(w, start, c, layout)
    logits = _block_logits(h_NxD, w_blk, layout)
    owned = cols >= own
    p = jnp.where(owned, jnp.exp(logits - lse[:, None]), 0.0)
    is_label = (owned & (cols == labels_N[:, None])).astype(jnp.float32)
    d_Nxc = (g_N[:, None] * (p - is_label)).astype(h_NxD.dtype)
    if layout == "vd":
      dh = dh + jnp.dot(d_Nxc, w_blk, preferred_element_type=jnp.float32)
      # The barrier keeps XLA from folding the transpose back into the product (as d^T h).
      dw_blk = jax.lax.optimization_barrier(jnp.dot(h_DxN, d_Nxc, preferred_element_type=jnp.float32)).T
      dw = jax.lax.dynamic_update_slice_in_dim(
          dw, jax.lax.dynamic_slice_in_dim(dw, start, c, 0) + dw_blk, start, axis=0)
    else:
      dh = dh + jax.lax.dot_general(d_Nxc, w_blk, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      dw_blk = jnp.dot(h_DxN, d_Nxc, preferred_element_type=jnp.float32)
      dw = jax.lax.dynamic_update_slice_in_dim(
          dw, jax.lax.dynamic_slice_in_dim(dw, start, c, 1) + dw_blk, start, axis=1)
    return dh, dw

  init = (jnp.zeros(h_NxD.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
  dh, dw = jax.lax.fori_loop(0, -(-v // c), body, init)
  return dh.astype(h_NxD.dtype), dw.astype(w.dtype), None


blocked_token_nll.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_argmax(h_NxD, w, block: int, layout: str = "vd"):
  """``argmax(h @ W, -1)`` (int32, the first maximum as ``jnp.argmax``) in vocabulary blocks."""
  return _scan_blocks(jax.lax.stop_gradient(h_NxD), jax.lax.stop_gradient(w), None, block, layout)[2]


def projected_argmax(h_xD, w, layout: str = "vd"):
  """``argmax(h @ W)`` over the vocabulary for any leading shape; blocked when V is large."""
  v = w.shape[0] if layout == "vd" else w.shape[1]
  lead = h_xD.shape[:-1]
  h = sharding.constrain_rows(h_xD.reshape(-1, h_xD.shape[-1]))
  c = vocab_block_size(v, h.shape[0])
  if c:
    return blocked_argmax(h, w, c, layout).reshape(lead)
  logits = sharding.constrain_rows(_block_logits(h, w, layout), "act_vocab")
  return jnp.argmax(logits, -1).astype(jnp.int32).reshape(lead)


def projected_token_nll(h_xD, w, labels_x, layout: str = "vd"):
  """Per-token ``(nll_x, correct_x)`` (fp32) of ``softmax(h @ W)`` for any leading shape ``x``:
  blocked over the vocabulary when V is large (:func:`blocked_token_nll`), else the plain path
  (:func:`calm_jax.models.layers.tied_logits` or ``h @ W``, then :func:`token_nll`)."""
  v = w.shape[0] if layout == "vd" else w.shape[1]
  # Rows on the batch axes and the plain logits' columns by the rules table's act_vocab: without
  # these XLA's propagation may gather the activations instead of the projection (issue 14).
  h = sharding.constrain_rows(h_xD.reshape(-1, h_xD.shape[-1]))
  labels = labels_x.reshape(-1)
  c = vocab_block_size(v, h.shape[0])
  if c:
    nll, correct = blocked_token_nll(h, w, labels, c, layout)
  else:
    if layout == "vd":
      logits = layers.tied_logits(h, w)
    else:
      logits = jnp.dot(h, w)
    logits = sharding.constrain_rows(logits, "act_vocab").astype(jnp.float32)
    nll = token_nll(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return nll.reshape(labels_x.shape), correct.reshape(labels_x.shape)


def projected_cross_entropy(h_xD, w, labels_x, mask_x=None, layout: str = "vd"):
  """``(mean CE, token accuracy)`` of ``softmax(h @ W)`` over (masked) tokens
  (:func:`projected_token_nll`)."""
  nll, correct = projected_token_nll(h_xD, w, labels_x, layout)
  nll, correct = nll.reshape(-1), correct.reshape(-1)
  if mask_x is None:
    return jnp.mean(nll), jnp.mean(correct)
  mask = mask_x.reshape(-1).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(nll * mask) / count, jnp.sum(correct * mask) / count


def autoencoder_loss(outputs, labels_BxT, cfg: AutoencoderConfig, train: bool = True):
  """The reference's AE objective.

  ``outputs`` is the dict returned by :class:`calm_jax.models.autoencoder.Autoencoder`: with
  ``logits``, or (large vocabularies) ``hidden`` and ``embedding``, whose cross-entropy and
  accuracy are then computed in vocabulary blocks (:func:`projected_cross_entropy`).
  Training: ``K * mean CE + kl_weight * clamped KL`` (K * token-mean CE is the
  per-chunk sum of Eq. 1).  Evaluation: the plain mean CE, as the reference.
  Returns ``(loss, metrics)``.
  """
  kl = clamped_kl(outputs["mean"], outputs["log_std"], cfg.kl_clamp)
  if "logits" in outputs:
    logits = outputs["logits"]
    v = logits.shape[-1]
    ce = token_cross_entropy(logits.reshape(-1, v), labels_BxT.reshape(-1))
    acc = jnp.mean((jnp.argmax(logits, -1).reshape(labels_BxT.shape) == labels_BxT).astype(jnp.float32))
  else:   # large V: the model returned the decoder's hidden states and the tied projection instead
    ce, acc = projected_cross_entropy(outputs["hidden"], outputs["embedding"], labels_BxT)
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
  # Position-major products ([P, A, B]): the batch axis leads, as XLA:CPU's batched GEMM wants it,
  # so operands stored position-major (posterior_samples' draws) need no transposed copy.
  ab = jnp.einsum("apl,bpl->pab", a_AxPxL, b_BxPxL, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(aa[:, None] + bb[None] - 2.0 * jnp.moveaxis(ab, 0, -1), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def self_distance_pow(x_NxPxL, beta: float):
  """``||x_i - x_j||^beta``, ``[N, N, P]``, from exact differences (the diagonal exactly 0).

  Its own VJP: autodiff's backward pass forms the ``[N, N, P, L]`` difference cotangent and
  reduces it along both sample axes (strided reductions, the slowest part of the CALM step's
  energy loss on the CPU).  The gradient is ``dx_i = sum_j W_ij (x_i - x_j)`` with
  ``W = w + w^T``, ``w_ij = g_ij * beta * ||x_i - x_j||^(beta - 2)`` (0 on the diagonal, as the
  zero subgradient of :func:`_safe_pow_norm`), i.e. ``x_i * rowsum(W) - (W x)_i``: one small
  batched product per position.
  """
  return _safe_pow_norm(pairwise_sq_dist_diff(x_NxPxL, x_NxPxL), beta)


def _self_distance_fwd(x_NxPxL, beta):
  sq = pairwise_sq_dist_diff(x_NxPxL, x_NxPxL)
  return _safe_pow_norm(sq, beta), (x_NxPxL, sq)


def _self_distance_bwd(beta, res, g_NxNxP):
  x, sq = res
  pos = sq > 0
  safe = jnp.where(pos, sq, 1.0)
  w = jnp.where(pos, g_NxNxP * beta * safe ** (0.5 * beta - 1.0), 0.0)   # d/d(sq) is w / 2
  w = w + jnp.swapaxes(w, 0, 1)
  wx = jnp.einsum("ijp,jpl->ipl", w, x, precision=jax.lax.Precision.HIGHEST)
  return (x * jnp.sum(w, axis=1)[..., None] - wx,)


self_distance_pow.defvjp(_self_distance_fwd, _self_distance_bwd)


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
  dxx = self_distance_pow(x, beta)
  dist_fn = {"diff": pairwise_sq_dist_diff, "gram": pairwise_sq_dist_gram}[pairwise]
  dxy = _safe_pow_norm(dist_fn(x, y), beta)
  return jnp.sum(dxx, axis=(0, 1)) / (n * (n - 1)) - 2.0 * jnp.mean(dxy, axis=(0, 1))


def posterior_samples(key, mean_PxL, log_std_PxL, num: int):
  """``num`` samples of the frozen autoencoder's posterior, ``[num, P, L]``, no gradient.  The
  standard normals come from :func:`calm_jax.models.rng.normal` (half the threefry work of
  ``jax.random.normal``; these draws were a fifth of the CALM step on the CPU)."""
  mean = jax.lax.stop_gradient(mean_PxL.astype(jnp.float32))
  std = jnp.exp(jax.lax.stop_gradient(log_std_PxL.astype(jnp.float32)))
  # Drawn position-major ([P, num, L], each position's samples together: the layout the energy
  # score's batched products read), returned as the [num, P, L] view.  The threefry words are
  # paired along the samples axis: P is sharded over the batch axes, the samples never are.
  eps = jnp.moveaxis(rng.normal(key, mean.shape[:1] + (num,) + mean.shape[1:], jnp.float32, axis=1), 1, 0)
  return mean[None] + std[None] * eps


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
