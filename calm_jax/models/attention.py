"""Softmax attention implementations behind ``LlamaConfig.attention_impl``.

Dimension legend: B batch, T query positions, S key positions (the cache's C slots when decoding),
H query heads, G key/value heads (GQA: H = G * R), Dh head width, Q a query block, J a key block.

  ``xla``       scores ``[B, H, T, S]`` in fp32, masked, softmax, ``@ V`` (the plain path; any mask)
  ``chunked``   the same numbers in query blocks: a query block reads only the keys at or before
                its last position (the causal upper triangle is never computed), and past
                ``KV_BLOCK`` keys it folds key blocks into an online softmax under a per-block
                rematerialisation, so neither the forward nor the backward holds ``[T, S]``
                scores.  Plain JAX, every platform; the CPU's choice.
  ``cudnn``     ``jax.nn.dot_product_attention(implementation='cudnn')``: the fused flash kernel on
                NVIDIA GPUs (bf16 / fp16 only; causal without a cache)
  ``splash``    Pallas splash attention on TPUs (``jax.experimental.pallas.ops.tpu``; causal
                without a cache)
  ``dot_product_attention``  ``jax.nn.dot_product_attention`` with XLA's choice (kept for configs
                that name it)
  ``auto``      by platform and call: cuDNN on a GPU in bf16 / fp16, splash on a TPU, else chunked
                for long causal contexts and ``xla`` for short ones; with a KV cache (an explicit
                mask) always ``chunked`` / ``xla``.

All paths compute the softmax in fp32 and agree with ``xla`` to fp32 reassociation (forward and
gradient, tested); masked entries get a large finite negative score so that a fully masked row
(left padding) stays NaN-free.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30
Q_BLOCK = 128        # query rows per block of the chunked path
KV_BLOCK = 1024      # keys per block of its online softmax (a prefix up to this is one block)
CHUNK_MIN_T = 256    # 'auto' on a CPU: the chunked path from this many query positions on


def attend_xla(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS):
  """The plain path: fp32 scores and softmax, GQA by grouping query heads."""
  b, t, h, dh = q_BxTxHxDh.shape
  g = k_BxSxGxDh.shape[2]
  q = q_BxTxHxDh.reshape(b, t, g, h // g, dh)
  scores = jnp.einsum("btgrd,bsgd->bgrts", q, k_BxSxGxDh).astype(jnp.float32) / jnp.sqrt(dh).astype(
      jnp.float32)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxDh.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs, v_BxSxGxDh)
  return out.reshape(b, t, h, dh)


def _query_block(q_BxQxGxRxDh, k_BxSxGxDh, v_BxSxGxDh, q0: int, kend: int, mask_BxQxS, kv_block: int):
  """Attention of one query block (rows ``q0 ..``) over keys ``[0, kend)``; output [B, Q, G, R, Dh].

  ``mask_BxQxS`` None: causal by position (only the key block that crosses the diagonal is
  masked).  One key block: softmax as :func:`attend_xla`; several: online softmax.
  """
  nq, dh = q_BxQxGxRxDh.shape[1], q_BxQxGxRxDh.shape[-1]
  inv = 1.0 / jnp.sqrt(jnp.float32(dh))
  m = l = acc = None
  starts = list(range(0, kend, kv_block))
  for k0 in starts:
    k1 = min(k0 + kv_block, kend)
    s = jnp.einsum("bqgrd,bsgd->bgrqs", q_BxQxGxRxDh, k_BxSxGxDh[:, k0:k1]).astype(jnp.float32) * inv
    if mask_BxQxS is not None:
      s = jnp.where(mask_BxQxS[:, None, None, :, k0:k1], s, NEG_INF)
    elif k1 > q0 + 1:   # the block crosses the diagonal
      causal = (k0 + jnp.arange(k1 - k0))[None, :] <= (q0 + jnp.arange(nq))[:, None]
      s = jnp.where(causal, s, NEG_INF)
    v_blk = v_BxSxGxDh[:, k0:k1]
    if len(starts) == 1:
      probs = jax.nn.softmax(s, axis=-1).astype(v_blk.dtype)
      return jnp.einsum("bgrqs,bsgd->bqgrd", probs, v_blk)
    bm = jnp.max(s, axis=-1)
    m_new = bm if m is None else jnp.maximum(m, bm)
    p = jnp.exp(s - m_new[..., None])
    pv = jnp.einsum("bgrqs,bsgd->bgrqd", p.astype(v_blk.dtype), v_blk).astype(jnp.float32)
    if m is None:
      l, acc = jnp.sum(p, axis=-1), pv
    else:
      alpha = jnp.exp(m - m_new)
      l = l * alpha + jnp.sum(p, axis=-1)
      acc = acc * alpha[..., None] + pv
    m = m_new
  out = (acc / l[..., None]).astype(v_BxSxGxDh.dtype)          # B x G x R x Q x Dh
  return jnp.transpose(out, (0, 3, 1, 2, 4))


def attend_chunked(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS=None, q_block: int | None = None,
                   kv_block: int | None = None):
  """Query-blocked attention.  ``mask_BxTxS`` None: causal self-attention (S = T, position i sees
  keys <= i; the keys after a block's last row are skipped).  With a mask (the KV-cache path):
  every block reads all S keys under the mask.  Block sizes default to ``Q_BLOCK``/``KV_BLOCK``
  (read at trace time)."""
  q_block = q_block or Q_BLOCK
  kv_block = kv_block or KV_BLOCK
  b, t, h, dh = q_BxTxHxDh.shape
  s, g = k_BxSxGxDh.shape[1], k_BxSxGxDh.shape[2]
  q = q_BxTxHxDh.reshape(b, t, g, h // g, dh)
  outs = []
  for q0 in range(0, t, q_block):
    q1 = min(q0 + q_block, t)
    kend = q1 if mask_BxTxS is None else s
    mask = None if mask_BxTxS is None else mask_BxTxS[:, q0:q1]
    fn = functools.partial(_query_block, q0=q0, kend=kend, kv_block=kv_block)
    if kend > kv_block:   # long context: recompute the block's scores in the backward pass
      fn = jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    outs.append(fn(q[:, q0:q1], k_BxSxGxDh, v_BxSxGxDh, mask_BxQxS=mask))
  return jnp.concatenate(outs, axis=1).reshape(b, t, h, dh)


def attend_cudnn(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh):
  """Causal self-attention through cuDNN's fused kernel (GPU, bf16 / fp16)."""
  return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, is_causal=True,
                                      implementation="cudnn")


def attend_splash(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, interpret: bool = False):
  """Causal self-attention through Pallas splash attention (TPU; ``interpret`` runs the kernel in
  the Pallas interpreter, any platform, for tests).  GQA by repeating the key/value heads."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel

  b, t, h, dh = q_BxTxHxDh.shape
  g = k_BxSxGxDh.shape[2]
  blk = min(512, t)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(h)])
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                        block_kv_dkv_compute=blk, use_fused_bwd_kernel=True)
  kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  scale = 1.0 / math.sqrt(dh)
  q = jnp.transpose(q_BxTxHxDh * jnp.asarray(scale, q_BxTxHxDh.dtype), (0, 2, 1, 3))   # B x H x T x Dh
  k = jnp.repeat(jnp.transpose(k_BxSxGxDh, (0, 2, 1, 3)), h // g, axis=1)
  v = jnp.repeat(jnp.transpose(v_BxSxGxDh, (0, 2, 1, 3)), h // g, axis=1)
  out = jax.vmap(kernel)(q, k, v)
  return jnp.transpose(out, (0, 2, 1, 3))


def resolve(impl: str, platform: str, dtype, t: int, cached: bool) -> str:
  """The implementation ``attention_impl=impl`` runs for a call with ``t`` query positions on
  ``platform`` ('cpu' | 'gpu' | 'tpu') in compute ``dtype``; ``cached``: a KV-cache call (an
  explicit mask, which the fused kernels are not given)."""
  if impl != "auto":
    if impl in ("cudnn", "splash", "dot_product_attention") and cached:
      return "chunked" if t >= CHUNK_MIN_T else "xla"
    return impl
  if not cached:
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return "cudnn"
    if platform == "tpu" and t % 128 == 0:
      return "splash"
  return "chunked" if t >= CHUNK_MIN_T else "xla"


def attend(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS, impl: str = "auto", cached: bool = False):
  """Attention by ``impl`` (see the module doc).  ``mask_BxTxS``: the explicit mask, used by the
  plain and chunked paths with a cache (without one the call is causal self-attention and the
  mask is the lower triangle)."""
  which = resolve(impl, jax.default_backend(), q_BxTxHxDh.dtype, q_BxTxHxDh.shape[1], cached)
  if which == "xla":
    return attend_xla(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS)
  if which == "chunked":
    return attend_chunked(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS if cached else None)
  if which == "cudnn":
    return attend_cudnn(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh)
  if which == "splash":
    return attend_splash(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh)
  if which == "dot_product_attention":
    return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, is_causal=True)
  raise ValueError(f"attention_impl: unknown implementation {impl!r}")
