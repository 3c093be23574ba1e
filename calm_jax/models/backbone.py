"""Llama-style decoder backbone with a functional KV cache.

Dimension legend: B batch, T new positions in this call, C cache capacity
(slots), D width, H query heads, G key/value heads, Dh head width, F MLP width.

The backbone matches Hugging Face ``LlamaModel``: pre-norm RMSNorm blocks,
rotary embeddings on the two halves of each head, grouped-query attention,
SwiGLU MLP, no biases, a final RMSNorm.  It takes input *embeddings* (CALM feeds
compressed chunk vectors, the baseline feeds token embeddings) and returns
hidden states.

KV cache.  A cache is a plain pytree ``{'k': [.., B, C, G, Dh], 'v': ..., 'valid':
[B, C] bool, 'index': int32[]}``: slots ``< index`` are filled, ``valid`` marks
which of them hold real tokens (left padding of ragged prompts is ``False``).
A call with T inputs writes slots ``index .. index+T-1`` and every query
attends to filled, valid slots at or before its own.  Rotary positions are
passed separately (``positions_BxT``) so that padded rows keep correct
positions.  Decoding with the cache gives the same hidden states as the full
forward (tested).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import LlamaConfig, dtype_of
from calm_jax.models import attention, layers
from calm_jax.parallel import sharding

Cache = dict[str, Any]

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axes of the activations (sharding.constrain): the residual stream and per-head tensors.
_BTD = ("batch", "length", "act_embed")
_BTHD = ("batch", "length", "act_heads", "head_dim")

_NEG_INF = attention.NEG_INF  # large finite value: a fully-masked row (left padding) stays NaN-free


def init_cache(cfg: LlamaConfig, batch_size: int, capacity: int, dtype=None) -> Cache:
  """An empty cache for ``capacity`` positions (layers stacked on axis 0 when scanned)."""
  dtype = dtype or dtype_of(cfg.dtype)
  shape = (batch_size, capacity, cfg.num_key_value_heads, cfg.head_dim)
  if cfg.scan_layers:
    kv = {"k": jnp.zeros((cfg.num_hidden_layers,) + shape, dtype),
          "v": jnp.zeros((cfg.num_hidden_layers,) + shape, dtype)}
  else:
    kv = {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)],
          "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]}
  return dict(kv, valid=jnp.zeros((batch_size, capacity), bool), index=jnp.zeros((), jnp.int32))


def _attend(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS):
  """Softmax attention in fp32 with GQA by grouping query heads (the plain path,
  :func:`calm_jax.models.attention.attend_xla`)."""
  return attention.attend_xla(q_BxTxHxDh, k_BxSxGxDh, v_BxSxGxDh, mask_BxTxS)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, cos, sin, mask, kv_cache, index):
    cfg = self.cfg
    kw = dict(std=cfg.initializer_range, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
    h, g, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = layers.Dense((h, dh), ("embed", "heads", "head_dim"), name="q_proj", **kw)(x_BxTxD)
    k = layers.Dense((g, dh), ("embed", "kv_heads", "head_dim"), name="k_proj", **kw)(x_BxTxD)
    v = layers.Dense((g, dh), ("embed", "kv_heads", "head_dim"), name="v_proj", **kw)(x_BxTxD)
    # Heads split as the rules table says ('act_heads'), rows on the batch axes.
    q, k, v = (sharding.constrain(a, _BTHD) for a in (q, k, v))
    q = layers.apply_rotary(q, cos, sin)
    k = layers.apply_rotary(k, cos, sin)
    new_cache = None
    if kv_cache is not None:
      ck = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k.astype(kv_cache["k"].dtype), index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v.astype(kv_cache["v"].dtype), index, axis=1)
      new_cache = {"k": ck, "v": cv}
      k, v = ck.astype(q.dtype), cv.astype(q.dtype)
    # cfg.attention_impl picks the kernel (calm_jax.models.attention: 'auto' by platform).
    out = attention.attend(q, k, v, mask, cfg.attention_impl, cached=kv_cache is not None)
    out = sharding.constrain(out, _BTHD)
    y = layers.Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_axes=2, name="o_proj", **kw)(out)
    return y, new_cache


class DecoderLayer(nn.Module):
  """One pre-norm block; signature fits ``nn.scan`` (carry, per-layer cache, broadcasts)."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, kv_cache, cos, sin, mask, index):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    x = sharding.constrain(x, _BTD)   # block boundary: the residual stream stays split over the batch
    y = layers.RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    y, new_cache = Attention(cfg, name="self_attn")(y, cos, sin, mask, kv_cache, index)
    x = sharding.constrain(x + y, _BTD)
    y = layers.RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    y = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range, dt, pdt, name="mlp")(y)
    return sharding.constrain(x + y, _BTD), new_cache


class LlamaModel(nn.Module):
  """Token embedding + decoder layers + final norm (HF ``LlamaModel``)."""
  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, dt, pdt)
    block = DecoderLayer
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dt, pdt)

  def embed(self, ids):
    return self.embed_tokens(ids)

  def __call__(self, x_BxTxD, positions_BxT=None, cache: Cache | None = None, valid_BxT=None):
    """Runs the layers.  Returns ``(h_BxTxD, new_cache or None)``.

    Without a cache the attention is plain causal over the T inputs (every
    position valid).  With a cache the inputs are appended at ``cache['index']``;
    ``valid_BxT`` (default all True) marks padding among the new inputs.
    """
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    if positions_BxT is None:
      start = 0 if cache is None else cache["index"]
      positions_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = layers.rotary_cos_sin(positions_BxT, cfg.head_dim, cfg.rope_theta)
    x = sharding.constrain(x_BxTxD.astype(dtype_of(cfg.dtype)), _BTD)
    if cache is None:
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
      index = jnp.zeros((), jnp.int32)
      kv = None
    else:
      index = cache["index"]
      if valid_BxT is None:
        valid_BxT = jnp.ones((b, t), bool)
      valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_BxT, index, axis=1)
      cap = valid.shape[1]
      q_slot = index + jnp.arange(t)
      causal = jnp.arange(cap)[None, :] <= q_slot[:, None]
      mask = causal[None] & valid[:, None, :]
      kv = {"k": cache["k"], "v": cache["v"]}
    if cfg.scan_layers:
      x, new_kv = self.layers(x, kv, cos, sin, mask, index)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        layer_kv = None if kv is None else {"k": kv["k"][i], "v": kv["v"][i]}
        x, nc = layer(x, layer_kv, cos, sin, mask, index)
        if nc is not None:
          new_k.append(nc["k"])
          new_v.append(nc["v"])
      new_kv = None if kv is None else {"k": new_k, "v": new_v}
    h = sharding.constrain(self.norm(x), _BTD)
    if cache is None:
      return h, None
    return h, dict(new_kv, valid=valid, index=index + t)
