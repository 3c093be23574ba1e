"""The energy head (the reference's ``MLPGenerator`` in ``EnergyTransformer``): one network call a sample.

Dimension legend: B batch, S positions, D width, L latent, E noise size,
N model samples per position, M posterior (target) samples, P = B*S positions.

``latent = f(hidden, noise)`` with noise ~ U[-0.5, 0.5]^E drawn by the caller
(:func:`sample_noise`).  Training scores N samples per position against M
samples of the frozen autoencoder's posterior with the energy score
(:func:`calm_jax.models.losses.energy_loss`); see CALM_NOTES §2.3.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import EnergyConfig, dtype_of
from calm_jax.models import layers, losses, rng
from calm_jax.models.heads import base


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
    return layers.add_broadcast(a.astype(self.dtype) @ kernel[:da], b.astype(self.dtype) @ kernel[da:] + bias)


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


def sample_noise(key, shape, noise_size: int, dtype=jnp.float32):
  """The head's noise: i.i.d. U[-0.5, 0.5] of shape ``shape + (noise_size,)``."""
  return jax.random.uniform(key, tuple(shape) + (noise_size,), dtype) - 0.5


def _dense(n_in: int, n_out: int, bias: bool) -> int:
  return n_in * n_out + (n_out if bias else 0)


class Energy(base.GenerativeHead):
  """The energy head behind the interface.  Option ``pairwise``: 'gram' | 'diff', how the
  energy score forms its N x N and N x M distances (:func:`calm_jax.models.losses.energy_score`)."""
  name = "energy"

  def __init__(self, cfg: EnergyConfig, pairwise: str = "gram", **options):
    super().__init__(cfg, **options)
    self.pairwise = pairwise
    self.noise_shape = (cfg.noise_size,)

  def module(self):
    return EnergyHead(self.cfg)

  def init_call(self, module, h_xD, noise):
    return module(h_xD, noise)

  def noise(self, key, shape):
    return sample_noise(key, shape, self.cfg.noise_size)

  def sample(self, head_params, h_xD, noise):
    return EnergyHead(self.cfg).apply({"params": head_params}, h_xD, noise)

  @property
  def network_calls(self) -> int:
    return 1

  def loss(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, mask_BxS=None):
    """The energy loss with one key split over the whole batch (noise, then posterior samples)."""
    cfg = self.cfg
    b, s = h_BxSxD.shape[:2]
    k_noise, k_target = jax.random.split(key)
    noise = sample_noise(k_noise, (cfg.num_samples, b, s), cfg.noise_size)
    preds = self.sample(head_params, h_BxSxD[None], noise)                       # N x B x S x L
    p = b * s
    x = preds.reshape(cfg.num_samples, p, -1)
    y = losses.posterior_samples(k_target, mean_BxSxL.reshape(p, -1), log_std_BxSxL.reshape(p, -1),
                                 cfg.num_target_samples)
    mask = None if mask_BxS is None else mask_BxS.reshape(p)
    loss = losses.energy_loss(x, y, cfg.beta, mask, self.pairwise)
    return loss, self.metrics(loss)

  def row_losses(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows_B):
    """Negative energy score per position; row r's noise from ``fold_in(k_noise, r)`` and its posterior
    draws from ``fold_in(k_target, r)``, ``(k_noise, k_target) = split(key)``."""
    cfg = self.cfg
    b, s = h_BxSxD.shape[:2]
    k_noise, k_target = jax.random.split(key)
    noise = base.row_draws(k_noise, rows_B, lambda k: self.noise(k, (cfg.num_samples, s)))   # N x B x S x E
    preds = self.sample(head_params, h_BxSxD[None], noise)                                    # N x B x S x L
    eps = base.row_draws(k_target, rows_B, lambda k: rng.normal(
        k, (cfg.num_target_samples, s, cfg.latent_size), jnp.float32))                       # M x B x S x L
    mean = jax.lax.stop_gradient(mean_BxSxL.astype(jnp.float32))
    std = jnp.exp(jax.lax.stop_gradient(log_std_BxSxL.astype(jnp.float32)))
    y = mean[None] + std[None] * eps
    x = preds.reshape(cfg.num_samples, b * s, -1)
    neg = -losses.energy_score(x, y.reshape(cfg.num_target_samples, b * s, -1), cfg.beta, self.pairwise)
    return neg.reshape(b, s)

  # ------------------------------------------------------------------ cost
  def param_counts(self):
    """Every linear has a bias, every norm is an affine LayerNorm (CALM_NOTES §2.3)."""
    cfg = self.cfg
    d, l, e = cfg.backbone.hidden_size, cfg.latent_size, cfg.noise_size
    block = 2 * d + _dense(2 * d, d, True) + _dense(d, d, True) + _dense(d, 2 * d, True) + _dense(d, d, True)
    return {"noise_embd": _dense(e, d, True) + 2 * d,
            "hidden_embd": _dense(d, d, True) + 2 * d,
            "blocks": cfg.num_mlp_layers * block,
            "final": 2 * d + _dense(d, d, True) + _dense(d, l, True)}

  def forward_flops(self, num_samples, train, convention="factored"):
    """``num_samples`` noise draws at one position, train or not (one call a sample).

    The conventions differ only in what runs once per position rather than once
    per sample (they agree at one sample):

    ``reference``    everything per sample: the PyTorch reference repeats the
                     hidden state N times before the head.
    ``shared_cond``  the hidden state's projection (d x d) once per position,
                     broadcast over the samples: what :class:`EnergyHead` computes.
    ``factored``     every matmul that depends on the hidden state alone once per
                     position: the projection and, in each block, the conditioning
                     half of the first linear (its input is concat(LN(x), cond), so
                     W·[a; c] = W_a·a + W_c·c with W_c·c shared).  The least work
                     an exact implementation needs; it fits Table 1 best.
    """
    del train
    base.check_convention(convention)
    cfg = self.cfg
    d, l, e, nb = cfg.backbone.hidden_size, cfg.latent_size, cfg.noise_size, cfg.num_mlp_layers
    # Per block: linear_0 2d->d (half noise stream, half cond), linear_1 d->d, linear_2 d->2d, down d->d.
    cond_proj, block_cond, block_rest = d * d, d * d, 5 * d * d
    per_sample = e * d + nb * block_rest + d * d + d * l    # noise_embd, blocks, final linears
    per_position = 0
    if convention == "reference":
      per_sample += cond_proj + nb * block_cond
    elif convention == "shared_cond":
      per_sample += nb * block_cond
      per_position += cond_proj
    else:
      per_position += cond_proj + nb * block_cond
    return 2.0 * (num_samples * per_sample + per_position)

  def activation_bytes(self, bytes_per_element):
    """N samples x (the noise stream's D-wide activations: 6 + 12 per block, and the latent, plus the
    fp32 input and output of each LayerNorm: one per block, the noise's and the final one, since
    layers.LayerNorm computes in fp32; measured on CALM-XL compiled for v5p, docs/SHARDING.md); the
    score's N x N and N x M distances (fp32, with their gradients) and the M posterior samples."""
    cfg = self.cfg
    d, n, m, lat = cfg.backbone.hidden_size, cfg.num_samples, cfg.num_target_samples, cfg.latent_size
    head = n * (bytes_per_element * (d * (6 + 12 * cfg.num_mlp_layers) + lat)
                + 8 * d * (cfg.num_mlp_layers + 2))
    return head, 12 * (n * n + n * m) + 4 * m * lat

  # ------------------------------------------------------------------ interop
  reference_class = "EnergyTransformer"
  reference_twins = ("mlp_generator",)   # EnergyTransformer registers its MLPGenerator twice

  def reference_layout(self):
    e = [(("noise_embd",), "noise_embd", "linear"), (("hidden_embd",), "hidden_embd", "linear"),
         (("norm_noise",), "norm_noise", "norm_bias"), (("norm_hidden",), "norm_hidden", "norm_bias")]
    for j in range(self.cfg.num_mlp_layers):
      b, r = f"mlp_blocks_{j}", f"mlp_blocks.{j}"
      e += [((b, "in_ln"), f"{r}.in_ln", "norm_bias"), ((b, "linear_0"), f"{r}.linears.0", "linear"),
            ((b, "linear_1"), f"{r}.linears.2", "linear"), ((b, "linear_2"), f"{r}.linears.4", "linear"),
            ((b, "down_proj"), f"{r}.down_proj", "linear")]
    return e + [(("final_in_ln",), "final_layer.in_ln", "norm_bias"),
                (("final_linear_0",), "final_layer.linears.0", "linear"),
                (("final_linear_1",), "final_layer.linears.2", "linear")]

  @classmethod
  def in_state_dict(cls, sd, prefix, latent_size):
    return f"{prefix}.noise_embd.weight" in sd
