"""Building blocks shared by every calm_jax model.

Every parameter is created through :func:`param_init`, which attaches logical
axis names (see :mod:`calm_jax.parallel.sharding` for the table that maps them onto a
device mesh).  Logical axes used by the models:

  vocab      vocabulary rows of an embedding or LM head
  embed      the model width D (residual stream)
  mlp        hidden width of MLPs (SwiGLU intermediate, head MLP widths)
  heads      query heads;  kv_heads  key/value heads;  head_dim  per-head width
  latent     the autoencoder latent L (and its 2L mean/log-std output)
  noise      the energy head's noise input
  patch      K * D concatenations (squeeze / expand / input compression)
  norm       scales and biases of normalisation layers
  layers     the stacked-layer axis when layers are scanned

Initialisation follows Hugging Face ``post_init``: weights ~ N(0, 0.02), biases
zero, norm scales one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from calm_jax.parallel import sharding

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Init:
  """A parameter initialiser that says what it draws: ``N(0, std^2)``, zeros or ones.

  Callable as a flax initializer ``(key, shape, dtype)``.  Because the kind is
  data, :func:`calm_jax.models.init_params` can draw all parameters from a few
  grouped random calls instead of one flax RNG split and draw per parameter
  (each costs compile time: see there).
  """
  kind: str              # 'normal' | 'zeros' | 'ones' | 'uniform' (U[-std, std]: xavier_uniform)
  std: float = 0.0

  def __call__(self, key, shape, dtype=jnp.float32):
    if _SHAPES_ONLY[0] or self.kind == "zeros":
      return jnp.zeros(shape, dtype)
    if self.kind == "ones":
      return jnp.ones(shape, dtype)
    if self.kind == "uniform":
      return self.std * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    return self.std * jax.random.normal(key, shape, dtype)


ZEROS, ONES = Init("zeros"), Init("ones")

# True while calm_jax.models traces a model's init for its shapes only: the initialisers then
# skip their random draws (and flax never derives the per-parameter keys), which makes that trace
# cheap.  Values made in this mode are placeholders; only shapes and dtypes are read.
_SHAPES_ONLY = [False]


@contextlib.contextmanager
def shapes_only():
  _SHAPES_ONLY[0], prev = True, _SHAPES_ONLY[0]
  try:
    yield
  finally:
    _SHAPES_ONLY[0] = prev


class Param(nn.LogicallyPartitioned):
  """flax's logical-axes box, also carrying the parameter's :class:`Init`."""
  init: Init | None = struct.field(default=None, pytree_node=False)


def param_init(init: Init, axes: Sequence[str | None]):
  """``init`` wrapped to return a :class:`Param` box with logical axis names ``axes``."""
  if not isinstance(init, Init):
    raise TypeError(f"param_init: expected a layers.Init, got {init!r}")
  names = tuple(axes)
  return lambda *args, **kwargs: Param(init(*args, **kwargs), names, init=init)


def normal_init(std: float) -> Init:
  return Init("normal", float(std))


def flat_matmul(x, kernel, in_axes: int = 1):
  """``x @ kernel`` contracting x's last ``in_axes`` axes with kernel's first, as one 2-D GEMM.

  Leading axes are folded into rows (and the contracted/output axes into one
  each) before the product and unfolded after.  On XLA:CPU a dot_general that
  contracts several axes (the weight gradient of ``[B, T, D] @ [D, F]``
  contracts B and T) is canonicalised with an explicit transpose of its
  ``[B, T, F]`` cotangent, fused into the elementwise op that produces it and
  run as a strided loop; a 2-D GEMM is handed to the library with the
  transposition folded into the kernel call, so these copies disappear (they
  were ~30 % of the autoencoder's train step).  The reshapes are bitcasts.
  """
  lead = x.shape[:x.ndim - in_axes]
  k_in = math.prod(kernel.shape[:in_axes])
  feats = kernel.shape[in_axes:]
  y = jnp.dot(x.reshape(math.prod(lead), k_in), kernel.reshape(k_in, math.prod(feats)))
  return y.reshape(lead + feats)


@jax.custom_vjp
def tied_logits(h_NxD, e_VxD):
  """``h @ E^T`` for a tied output projection (``E`` the ``[V, D]`` embedding), 2-D operands.

  Same value and gradients as the ``dot_general``; only the embedding's gradient
  is computed differently.  Autodiff's ``dE = g^T h`` contracts the rows of the
  ``[N, V]`` cotangent, a product XLA:CPU runs with the transposition folded into
  the GEMM call at about half the machine's matmul rate (a tenth where the
  allocator backs the cotangent with huge pages: its 4V-byte rows then collide
  in the cache).  Here the small ``h`` is transposed instead, the product is a
  plain ``[D, N] @ [N, V]`` GEMM, and its ``[D, V]`` result is transposed
  after; the barriers keep XLA from folding either transpose back into the
  product.  On a 2-core EPYC, ``N, D, V = 2048, 256, 8192``: 174 -> 108 ms.
  """
  return jax.lax.dot_general(h_NxD, e_VxD, (((1,), (1,)), ((), ())))


def _tied_logits_fwd(h_NxD, e_VxD):
  return tied_logits(h_NxD, e_VxD), (h_NxD, e_VxD)


def _tied_logits_bwd(res, g_NxV):
  h_NxD, e_VxD = res
  g_NxV = g_NxV.astype(h_NxD.dtype)
  dh = jnp.dot(g_NxV, e_VxD)
  h_DxN = jax.lax.optimization_barrier(h_NxD.T)
  de_DxV = jax.lax.optimization_barrier(jnp.dot(h_DxN, g_NxV))
  return dh.astype(h_NxD.dtype), de_DxV.T.astype(e_VxD.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def add_broadcast(a_SxX, b_X):
  """``a + b`` where ``b`` broadcasts against ``a``'s leading axes (shape ``a.shape[k:]``).

  Its own VJP: autodiff's transpose of the broadcast is a reduction over the leading axes, which
  XLA:CPU hands to a library kernel that is ~50x slower than summing the slices (5.6 ms against
  0.1 ms for the energy head's [8, 8, 63, 256] cotangent).  Here the slices are added one by one
  (one fused elementwise pass) when there are at most 64 of them.  Equal shapes, or a ``b`` that
  is not the smaller operand, take the plain ``a + b``.
  """
  if a_SxX.shape == b_X.shape or jnp.broadcast_shapes(a_SxX.shape, b_X.shape) != a_SxX.shape:
    return a_SxX + b_X
  return _add_broadcast(a_SxX, b_X)


@jax.custom_vjp
def _add_broadcast(a_SxX, b_X):
  return a_SxX + b_X


def _add_broadcast_fwd(a, b):
  return a + b, b       # only b's shape and dtype are read


def _add_broadcast_bwd(res, g):
  b_shape, b_dtype = res.shape, res.dtype
  lead = g.shape[: g.ndim - len(b_shape)]
  g_lead = g.reshape((-1,) + g.shape[len(lead):])
  if g_lead.shape[0] <= 64:
    gb = g_lead[0]
    for i in range(1, g_lead.shape[0]):
      gb = gb + g_lead[i]
  else:
    gb = jnp.sum(g_lead, axis=0)
  # b may itself broadcast in its trailing axes (size-1 dims): reduce those normally.
  axes = tuple(i for i, (n, m) in enumerate(zip(b_shape, gb.shape)) if n == 1 and m != 1)
  if axes:
    gb = jnp.sum(gb, axis=axes, keepdims=True)
  return g, gb.astype(b_dtype)


_add_broadcast.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)


class Dense(nn.Module):
  """``y = x @ W (+ b)`` over the last input axes, with logical axis names.

  ``features`` may be a tuple (e.g. (heads, head_dim)); ``in_axes`` is the
  number of trailing input axes contracted.
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool = False
  in_axes: int = 1
  std: float = 0.02
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    init = ZEROS if self.zero_init else normal_init(self.std)
    kernel = self.param("kernel", param_init(init, self.axes), in_shape + feats, self.param_dtype)
    y = flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)
    if self.use_bias:
      bias = self.param("bias", param_init(ZEROS, self.axes[-len(feats):]), feats,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Llama RMSNorm: statistics in fp32, scale applied in the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", param_init(ONES, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard LayerNorm (mean and two-pass variance in fp32), affine, as ``torch.nn.LayerNorm``."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", param_init(ONES, ("norm",)), (d,), self.param_dtype)
    bias = self.param("bias", param_init(ZEROS, ("norm",)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class SwiGLU(nn.Module):
  """Llama MLP: ``down(silu(gate(x)) * up(x))``, no biases."""
  hidden_size: int
  intermediate_size: int
  std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
    hidden = sharding.constrain_rows(nn.silu(gate) * up, "act_mlp")
    return Dense(self.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(hidden)


class Embed(nn.Module):
  """Token embedding ``[V, D]`` with an ``attend`` for tied output projections."""
  num_embeddings: int
  features: int
  std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", param_init(normal_init(self.std), ("vocab", "embed")),
                                (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, h):
    """Logits ``h @ E^T`` (the tied output projection, :func:`tied_logits`)."""
    e = self.embedding.astype(self.dtype)
    lead = h.shape[:-1]
    h2 = h.astype(self.dtype).reshape(math.prod(lead), h.shape[-1])
    return tied_logits(h2, e).reshape(lead + (e.shape[0],))


def rotary_cos_sin(positions, head_dim: int, theta: float):
  """Hugging Face Llama rotary tables for integer ``positions`` of any shape.

  Returns cos, sin of shape ``positions.shape + (head_dim,)`` in fp32; the two
  halves of each head are rotated together (``rotate_half``), not interleaved.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x_BxTxHxDh, cos_BxTxDh, sin_BxTxDh):
  half = x_BxTxHxDh.shape[-1] // 2
  x1, x2 = x_BxTxHxDh[..., :half], x_BxTxHxDh[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_BxTxDh[:, :, None, :].astype(x_BxTxHxDh.dtype)
  sin = sin_BxTxDh[:, :, None, :].astype(x_BxTxHxDh.dtype)
  return x_BxTxHxDh * cos + rotated * sin
