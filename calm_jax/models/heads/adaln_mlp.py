"""The network of the diffusion and flow heads: the MAR-style MLP with adaLN (reference ``SimpleMLPAdaLN``).

Dimension legend: D width (the backbone's), L latent, F = 256 timestep
frequencies, C output channels (2L for diffusion: epsilon and the variance
value; L for flow: the velocity).

``net(x_t, t, h)``: ``x = input_proj(x_t)``; the condition ``y = time_embed(t) +
cond_embed(h)`` (sinusoidal embedding of the *integer* timestep, cos before
sin, then Linear F->D, SiLU, Linear D->D; ``cond_embed`` a plain Linear of the
backbone's last hidden state); ``num_mlp_layers`` residual blocks ``x + gate *
MLP(LN(x) * (1 + scale) + shift)`` with (shift, scale, gate) = Linear(SiLU(y));
a final adaLN layer (LayerNorm without affine) and Linear D->C.  LayerNorms use
eps 1e-6.  Initialisation as the reference's ``initialize_weights``: every
linear xavier-uniform with zero bias, the time MLP's weights N(0, 0.02), every
adaLN linear and the output linear zero -- the network outputs 0 at init.

The condition ``cond_embed(h)`` is a separate method (:meth:`AdaLNMLP.condition`):
samplers compute it once per position and reuse it for every sample and step.
Parameter names follow the reference's modules (``res_blocks_0/mlp_0`` is
``res_blocks.0.mlp.0``), so interop is a rename.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import EnergyConfig, dtype_of
from calm_jax.models import layers

FREQUENCIES = 256
MAX_PERIOD = 10000


def xavier_uniform(fan_in: int, fan_out: int) -> layers.Init:
  return layers.Init("uniform", math.sqrt(6.0 / (fan_in + fan_out)))


class Linear(nn.Module):
  """``x @ W + b`` with the reference's initialisations: 'xavier', 'normal' (N(0, 0.02)) or 'zeros'."""
  features: int
  axes: tuple
  init: str = "xavier"
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    w_init = {"xavier": xavier_uniform(fan_in, self.features), "normal": layers.normal_init(0.02),
              "zeros": layers.ZEROS}[self.init]
    kernel = self.param("kernel", layers.param_init(w_init, self.axes), (fan_in, self.features),
                        self.param_dtype)
    bias = self.param("bias", layers.param_init(layers.ZEROS, self.axes[-1:]), (self.features,),
                      self.param_dtype)
    return layers.flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


def timestep_embedding(t, dim: int = FREQUENCIES, max_period: int = MAX_PERIOD):
  """Sinusoidal embedding of timesteps ``t`` (any shape; integers or floats): ``t.shape + (dim,)``,
  cos first, in fp32 (GLIDE's / the reference's ``TimestepEmbedder.timestep_embedding``)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t).astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


def _layer_norm(x, eps: float = 1e-6):
  """LayerNorm without affine parameters (torch ``elementwise_affine=False``), statistics in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class ResBlock(nn.Module):
  cfg: EnergyConfig

  @nn.compact
  def __call__(self, x, y):
    d = self.cfg.backbone.hidden_size
    kw = _kw(self.cfg)
    shift, scale, gate = jnp.split(Linear(3 * d, ("embed", "mlp"), "zeros", name="adaLN_modulation_1", **kw)(
        nn.silu(y)), 3, axis=-1)
    h = layers.LayerNorm(1e-6, name="in_ln", **kw)(x) * (1 + scale) + shift
    h = nn.silu(Linear(d, ("embed", "mlp"), name="mlp_0", **kw)(h))
    h = Linear(d, ("mlp", "embed"), name="mlp_2", **kw)(h)
    return x + gate * h


class FinalLayer(nn.Module):
  cfg: EnergyConfig
  out_channels: int

  @nn.compact
  def __call__(self, x, y):
    d = self.cfg.backbone.hidden_size
    kw = _kw(self.cfg)
    shift, scale = jnp.split(Linear(2 * d, ("embed", "mlp"), "zeros", name="adaLN_modulation_1", **kw)(
        nn.silu(y)), 2, axis=-1)
    x = _layer_norm(x) * (1 + scale) + shift
    return Linear(self.out_channels, ("embed", "latent"), "zeros", name="linear", **kw)(x)


def _kw(cfg: EnergyConfig):
  b = cfg.backbone
  return dict(dtype=dtype_of(b.dtype), param_dtype=dtype_of(b.param_dtype))


class AdaLNMLP(nn.Module):
  """``SimpleMLPAdaLN(in=L, width=D, out=out_channels, z=D, blocks=num_mlp_layers)``.

  Methods: ``__call__(x_t, t, h)`` (the reference's forward), ``condition(h) -> c``
  (``cond_embed``), ``denoise(x_t, t, c)`` (the forward with the condition given).
  ``x_t`` is ``[..., L]``, ``t`` broadcasts against its leading axes (integers 0..999),
  ``h``/``c`` are ``[..., D]`` and broadcast too.
  """
  cfg: EnergyConfig
  out_channels: int

  def setup(self):
    cfg = self.cfg
    d = cfg.backbone.hidden_size
    kw = _kw(cfg)
    self.time_embed_mlp_0 = Linear(d, ("noise", "embed"), "normal", **kw)
    self.time_embed_mlp_2 = Linear(d, ("embed", "mlp"), "normal", **kw)
    self.cond_embed = Linear(d, ("embed", "mlp"), **kw)
    self.input_proj = Linear(d, ("latent", "embed"), **kw)
    self.res_blocks = [ResBlock(cfg, name=f"res_blocks_{i}") for i in range(cfg.num_mlp_layers)]
    self.final_layer = FinalLayer(cfg, self.out_channels)

  def condition(self, h_xD):
    return self.cond_embed(h_xD)

  def time_embed(self, t):
    return self.time_embed_mlp_2(nn.silu(self.time_embed_mlp_0(timestep_embedding(t))))

  def denoise(self, x_xL, t, c_xD):
    x = self.input_proj(x_xL)
    y = self.time_embed(t) + c_xD
    for block in self.res_blocks:
      x = block(x, y)
    return self.final_layer(x, y)

  def __call__(self, x_xL, t, h_xD):
    return self.denoise(x_xL, t, self.condition(h_xD))


class NetHead(nn.Module):
  """The parameter holder of a diffusion / flow head: ``{'net': AdaLNMLP params}``, the reference's
  ``generative_head.net.*``.  ``__call__`` is one network call (used to create the parameters)."""
  cfg: EnergyConfig
  out_channels: int

  @nn.compact
  def __call__(self, x_xL, t, h_xD):
    return AdaLNMLP(self.cfg, self.out_channels, name="net")(x_xL, t, h_xD)


def _dense(n_in: int, n_out: int) -> int:
  return n_in * n_out + n_out


def param_counts(cfg: EnergyConfig, out_channels: int) -> dict[str, int]:
  """Parameters of :class:`AdaLNMLP` by part (every linear has a bias; the blocks' LayerNorms are affine)."""
  d, l, nb = cfg.backbone.hidden_size, cfg.latent_size, cfg.num_mlp_layers
  block = 2 * d + 2 * _dense(d, d) + _dense(d, 3 * d)
  return {"time_embed": _dense(FREQUENCIES, d) + _dense(d, d), "cond_embed": _dense(d, d),
          "input_proj": _dense(l, d), "blocks": nb * block,
          "final": _dense(d, 2 * d) + _dense(d, out_channels)}


def forward_flops(cfg: EnergyConfig, out_channels: int, num_samples: int, calls: int, train: bool,
                  convention: str) -> float:
  """Matmul FLOPs of ``calls`` network calls for each of ``num_samples`` samples at one position.

  Per call and sample: input_proj, the blocks' MLPs and the output linear.  The
  condition path -- the time MLP and every adaLN linear, functions of (t, h) --
  runs per position and call at inference (all samples share t), but per
  replicate in training (each draws its own t); ``cond_embed`` runs once per
  position.  Convention 'reference' counts everything per sample and call, as
  the PyTorch code (the hidden state repeated N times) does.
  """
  d, l, nb = cfg.backbone.hidden_size, cfg.latent_size, cfg.num_mlp_layers
  per_sample = l * d + nb * 2 * d * d + d * out_channels
  cond_path = FREQUENCIES * d + d * d + nb * 3 * d * d + 2 * d * d
  cond = d * d
  if convention == "reference":
    return 2.0 * num_samples * calls * (per_sample + cond_path + cond)
  if train:
    return 2.0 * (num_samples * calls * (per_sample + cond_path) + cond)
  return 2.0 * (calls * (num_samples * per_sample + cond_path) + cond)


def activation_bytes(cfg: EnergyConfig, out_channels: int, bytes_per_element: int) -> tuple[float, float]:
  """Per position, N replicates x (the stream's D-wide activations -- input_proj, and per block the
  LN, modulated input, MLP hidden and its SiLU, the gate product: ~6 -- the condition's adaLN outputs
  (3D per block, 2D final) and the time MLP (256 + 2D)), plus the fp32 latents of the loss (x0, noise,
  x_t, output: ~4L + C)."""
  d, l, nb, n = cfg.backbone.hidden_size, cfg.latent_size, cfg.num_mlp_layers, cfg.num_samples
  head = n * bytes_per_element * (d * (1 + 6 * nb + 3 * nb + 2 + 2) + FREQUENCIES + out_channels)
  return head, 4.0 * n * (4 * l + out_channels)


def reference_layout(cfg: EnergyConfig) -> list[tuple[tuple[str, ...], str, str]]:
  """Our paths (under ``generative_head``) and the reference's keys (under ``generative_head.``)."""
  e = [(("net", "time_embed_mlp_0"), "net.time_embed.mlp.0", "linear"),
       (("net", "time_embed_mlp_2"), "net.time_embed.mlp.2", "linear"),
       (("net", "cond_embed"), "net.cond_embed", "linear"),
       (("net", "input_proj"), "net.input_proj", "linear")]
  for i in range(cfg.num_mlp_layers):
    b, r = ("net", f"res_blocks_{i}"), f"net.res_blocks.{i}"
    e += [(b + ("in_ln",), f"{r}.in_ln", "norm_bias"), (b + ("mlp_0",), f"{r}.mlp.0", "linear"),
          (b + ("mlp_2",), f"{r}.mlp.2", "linear"),
          (b + ("adaLN_modulation_1",), f"{r}.adaLN_modulation.1", "linear")]
  return e + [(("net", "final_layer", "linear"), "net.final_layer.linear", "linear"),
              (("net", "final_layer", "adaLN_modulation_1"), "net.final_layer.adaLN_modulation.1", "linear")]


def output_channels_in_state_dict(sd, prefix: str):
  """The out channels of a reference ``SimpleMLPAdaLN`` under ``prefix`` (None when there is none)."""
  w = sd.get(f"{prefix}.net.final_layer.linear.weight")
  return None if w is None else w.shape[0]
