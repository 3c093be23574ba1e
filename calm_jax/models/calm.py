"""CALM with the energy generative head (the reference's ``EnergyTransformer``).

Dimension legend: B batch, T tokens, K tokens per chunk, S = T/K chunks,
D width, L latent, E noise size, N model samples per position.

Data flow.  The model reads discrete tokens: chunk j's K token embeddings
(CALM's own D-wide embedding, not the autoencoder's) are concatenated and
compressed (Linear K*D -> 2D, SiLU, Linear 2D -> D, LayerNorm) into one input
vector; the Llama backbone turns the sequence of chunk vectors into hidden
states; the hidden state at chunk j predicts the latent of chunk j+1 through
the generative head.  In training the model reads chunks 0..S-2 and is scored
against the frozen autoencoder's posterior of chunks 1..S-1.

The head is a pure function of (hidden state, noise): noise ~ U[-0.5, 0.5]^E
is drawn by the caller (``sample_noise``) and passed in, so the same noise
always gives the same latent.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import EnergyConfig, dtype_of
from calm_jax.models import layers
from calm_jax.models.backbone import Cache, LlamaModel
from calm_jax.parallel import sharding


def _kw(cfg: EnergyConfig):
  b = cfg.backbone
  return dict(std=b.initializer_range, dtype=dtype_of(b.dtype), param_dtype=dtype_of(b.param_dtype))


def _ln(cfg: EnergyConfig, name=None):
  b = cfg.backbone
  return layers.LayerNorm(1e-6, dtype_of(b.dtype), dtype_of(b.param_dtype), name=name)


class ConcatDense(nn.Module):
  """``concat(a, b) @ W + bias`` computed as ``a @ W[:Da] + b @ W[Da:] + bias``.

  The head's conditioning input is the same for all N samples of a position:
  splitting the matmul lets that half run once per position (b broadcasts
  against a's sample axis) instead of N times, with the reference's [Da+Db, out]
  kernel unchanged.
  """
  features: int
  axes: tuple
  std: float = 0.02
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, a, b):
    da, db = a.shape[-1], b.shape[-1]
    kernel = self.param("kernel", layers.param_init(layers.normal_init(self.std), self.axes),
                        (da + db, self.features), self.param_dtype).astype(self.dtype)
    bias = self.param("bias", layers.param_init(layers.ZEROS, self.axes[-1:]), (self.features,),
                      self.param_dtype).astype(self.dtype)
    return a.astype(self.dtype) @ kernel[:da] + (b.astype(self.dtype) @ kernel[da:] + bias)


class MLPBlock(nn.Module):
  """Residual block refining the noise stream x, conditioned on y (the projected hidden state)."""
  cfg: EnergyConfig

  @nn.compact
  def __call__(self, x, y):
    d = self.cfg.backbone.hidden_size
    kw = _kw(self.cfg)
    h = nn.silu(ConcatDense(d, ("mlp", "embed"), name="linear_0", **kw)(_ln(self.cfg, "in_ln")(x), y))
    h = nn.silu(layers.Dense(d, ("embed", "mlp"), use_bias=True, name="linear_1", **kw)(h))
    h = layers.Dense(2 * d, ("mlp", "embed"), use_bias=True, name="linear_2", **kw)(h)
    gate, up = h[..., :d], h[..., d:]
    return x + layers.Dense(d, ("embed", "mlp"), use_bias=True, name="down_proj", **kw)(nn.silu(gate) * up)


class EnergyHead(nn.Module):
  """The single-step generative head: ``latent = f(hidden, noise)``."""
  cfg: EnergyConfig

  @nn.compact
  def __call__(self, h_xD, noise_xE):
    cfg = self.cfg
    d = cfg.backbone.hidden_size
    kw = _kw(cfg)
    x = _ln(cfg, "norm_noise")(layers.Dense(d, ("noise", "embed"), use_bias=True, name="noise_embd",
                                            **kw)(noise_xE))
    y = _ln(cfg, "norm_hidden")(layers.Dense(d, ("embed", "mlp"), use_bias=True, name="hidden_embd",
                                             **kw)(h_xD))
    # No broadcast of y to x's sample axis: the conditioning work stays per position.
    for i in range(cfg.num_mlp_layers):
      x = MLPBlock(cfg, name=f"mlp_blocks_{i}")(x, y)
    x = _ln(cfg, "final_in_ln")(x)
    x = nn.silu(layers.Dense(d, ("embed", "mlp"), use_bias=True, name="final_linear_0", **kw)(x))
    # Zero-initialised last layer: the first predictions are 0 (reference ``initialize_weights``).
    return layers.Dense(cfg.latent_size, ("mlp", "latent"), use_bias=True, zero_init=True,
                        name="final_linear_1", **kw)(x)


class EnergyModel(nn.Module):
  """Input compression + backbone + energy head.

  Methods:
    ``hidden(tokens_BxT, positions_BxS=None, cache=None, valid_BxS=None)``
        -> ``(h_BxSxD, cache)``: one hidden state per chunk of the input.
    ``head(h, noise)`` -> latent; ``h`` and ``noise`` broadcast on leading axes.
    ``__call__(tokens_BxT, noise_NxBx(S-1)xE)`` -> latent predictions
        ``N x B x (S-1) x L`` for chunks 1..S-1 (training forward).
  """
  cfg: EnergyConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.backbone.hidden_size
    kw = _kw(cfg)
    self.transformer = LlamaModel(cfg.backbone)
    self.embed_proj_0 = layers.Dense(2 * d, ("patch", "mlp"), use_bias=True, **kw)
    self.embed_proj_2 = layers.Dense(d, ("mlp", "embed"), use_bias=True, **kw)
    self.embed_proj_3 = _ln(cfg)
    self.generative_head = EnergyHead(cfg)

  def compress(self, tokens_BxT):
    """K token embeddings per chunk -> one D vector per chunk."""
    b, t = tokens_BxT.shape
    k = self.cfg.patch_size
    e = self.transformer.embed(tokens_BxT).reshape(b, t // k, k * self.cfg.backbone.hidden_size)
    e = sharding.constrain(e, ("batch", "length", "patch"))
    return sharding.constrain(self.embed_proj_3(self.embed_proj_2(nn.silu(self.embed_proj_0(e)))),
                              ("batch", "length", "act_embed"))

  def hidden(self, tokens_BxT, positions_BxS=None, cache: Cache | None = None, valid_BxS=None):
    return self.transformer(self.compress(tokens_BxT), positions_BxS, cache, valid_BxS)

  def head(self, h, noise):
    return self.generative_head(h, noise)

  def __call__(self, tokens_BxT, noise_NxBxSxE):
    k = self.cfg.patch_size
    h_BxSxD, _ = self.hidden(tokens_BxT[:, :-k])
    return self.head(h_BxSxD[None], noise_NxBxSxE)


def sample_noise(key, shape, noise_size: int, dtype=jnp.float32):
  """The head's noise: i.i.d. U[-0.5, 0.5] of shape ``shape + (noise_size,)``."""
  return jax.random.uniform(key, tuple(shape) + (noise_size,), dtype) - 0.5
