"""The diffusion head (the reference's ``DiffLoss`` in ``DiffusionTransformer``; MAR's diffusion loss).

Dimension legend: B batch, S positions, D width, L latent, N training
replicates / samples per position, R respaced sampler steps.

Schedule: 1000-step cosine (``betas[i] = min(1 - abar((i+1)/T) / abar(i/T), 0.999)``,
``abar(u) = cos((u + 0.008) / 1.008 * pi/2)^2``), every table in float64 numpy,
cast to float32 when gathered (as the reference's ``_extract_into_tensor``).

Training (IDDPM's hybrid loss, ``learn_sigma``, epsilon prediction, no
rescaling): per replicate t ~ U{0..999}, ``x_t = sqrt(abar_t) x0 + sqrt(1 -
abar_t) eps``; the network outputs (eps_hat, v); loss = mean_L (eps - eps_hat)^2
+ vb, where vb is KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dim
with eps_hat *detached* (only v trains through it), log-variance ``frac log
beta_t + (1 - frac) log beta~_t`` with frac = (v + 1)/2, and at t = 0 the
decoder NLL of the discretised Gaussian (1/255 bins on [-1, 1], the image
likelihood the reference applies to latents unchanged).

Sampling: ancestral DDPM on the respaced schedule (``space_timesteps(1000,
"R")``, R = ``cfg.diffusion_sampling_steps``, 100 by default as the
reference), t = R-1 .. 0, the learned variance, no clipping, no noise at the
last step.  The network sees the original integer timestep.  The noise of one
sample is ``[R, L]``: x_T, then the noise added at each of the R - 1 steps
that add noise, in order.  Classifier-free guidance is not implemented (the
reference's calls a method it deleted; nothing trains an unconditional branch).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.configs import EnergyConfig
from calm_jax.models.heads import adaln_mlp, base

NUM_TIMESTEPS = 1000
MAX_BETA = 0.999


# --------------------------------------------------------------------------- schedule tables (float64)


def cosine_betas(num_timesteps: int = NUM_TIMESTEPS, max_beta: float = MAX_BETA) -> np.ndarray:
  abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
                   for i in range(num_timesteps)], np.float64)


def tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """The Gaussian-diffusion coefficient tables of ``betas`` (float64), as IDDPM names them."""
  betas = np.asarray(betas, np.float64)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  return {
      "betas": betas, "log_betas": np.log(betas), "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
      "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
      "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
      "posterior_variance": post_var,
      # beta~_0 is 0: the clipped log uses beta~_1 there.
      "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
      "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
      "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
  }


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
  """The ``count`` original timesteps kept by IDDPM's ``space_timesteps(T, str(count))`` (one
  section: evenly strided with rounding, first and last included), sorted."""
  if not 1 <= count <= num_timesteps:
    raise ValueError(f"diffusion_sampling_steps={count}: cannot take {count} of {num_timesteps} steps")
  stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
  steps, cur = [], 0.0
  for _ in range(count):
    steps.append(round(cur))
    cur += stride
  return sorted(set(steps))


@functools.lru_cache(maxsize=16)
def train_tables() -> dict[str, np.ndarray]:
  return tables(cosine_betas())


@functools.lru_cache(maxsize=16)
def respaced(count: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Tables of the respaced process and its map from spaced index to original timestep."""
  keep = space_timesteps(NUM_TIMESTEPS, count)
  ac = train_tables()["alphas_cumprod"]
  new_betas, last = [], 1.0
  for i in keep:
    new_betas.append(1 - ac[i] / last)
    last = ac[i]
  return tables(np.array(new_betas)), np.array(keep, np.int32)


def _at(table: np.ndarray, t):
  """``table[t]`` as float32 (gathered in float64, then cast: the reference's order)."""
  return jnp.asarray(table.astype(np.float32))[t][..., None]


# --------------------------------------------------------------------------- losses


def _approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) of a Gaussian discretised to 1/255 bins on [-1, 1] (IDDPM; elementwise, nats)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _model_mean_logvar(tab, x_t, i, eps, v):
  """p(x_{t-1} | x_t) of the learned-range parameterisation at (spaced) index ``i``."""
  min_log, max_log = _at(tab["posterior_log_variance_clipped"], i), _at(tab["log_betas"], i)
  frac = (v + 1) / 2
  log_var = frac * max_log + (1 - frac) * min_log
  x0_hat = _at(tab["sqrt_recip_alphas_cumprod"], i) * x_t - _at(tab["sqrt_recipm1_alphas_cumprod"], i) * eps
  mean = _at(tab["posterior_mean_coef1"], i) * x0_hat + _at(tab["posterior_mean_coef2"], i) * x_t
  return mean, log_var


def hybrid_loss_terms(out_xC, x0_xL, t_x, noise_xL):
  """``(mse, vb)`` per replicate for network output ``out = net(x_t, t)`` (``[..., 2L]``) with
  ``x_t = q_sample(x0, t, noise)``: IDDPM's ``training_losses`` (MSE loss type, learned range)."""
  tab = train_tables()
  l = x0_xL.shape[-1]
  eps, v = out_xC[..., :l], out_xC[..., l:]
  x_t = q_sample(x0_xL, t_x, noise_xL)
  mse = jnp.mean(jnp.square(noise_xL - eps), axis=-1)
  # The variational bound trains the variance only: the mean's output is detached.
  mean, log_var = _model_mean_logvar(tab, x_t, t_x, jax.lax.stop_gradient(eps), v)
  true_mean = _at(tab["posterior_mean_coef1"], t_x) * x0_xL + _at(tab["posterior_mean_coef2"], t_x) * x_t
  true_log_var = _at(tab["posterior_log_variance_clipped"], t_x)
  kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var), axis=-1) / np.log(2.0)
  nll = -jnp.mean(discretized_gaussian_log_likelihood(x0_xL, mean, 0.5 * log_var), axis=-1) / np.log(2.0)
  return mse, jnp.where(t_x == 0, nll, kl)


def q_sample(x0_xL, t_x, noise_xL):
  tab = train_tables()
  return (_at(tab["sqrt_alphas_cumprod"], t_x) * x0_xL
          + _at(tab["sqrt_one_minus_alphas_cumprod"], t_x) * noise_xL)


# --------------------------------------------------------------------------- the head


class Diffusion(base.GenerativeHead):
  name = "diffusion"

  def __init__(self, cfg: EnergyConfig, **options):
    super().__init__(cfg, **options)
    self.steps = cfg.diffusion_sampling_steps
    self.noise_shape = (self.steps, cfg.latent_size)
    self.out_channels = 2 * cfg.latent_size

  def module(self):
    return adaln_mlp.NetHead(self.cfg, self.out_channels)

  def init_call(self, module, h_xD, noise):
    return module(noise[..., 0, :], jnp.zeros(noise.shape[:-2], jnp.int32), h_xD)

  def _net(self):
    return adaln_mlp.AdaLNMLP(self.cfg, self.out_channels)

  def noise(self, key, shape):
    return jax.random.normal(key, tuple(shape) + self.noise_shape, jnp.float32)

  @property
  def network_calls(self) -> int:
    return self.steps

  def with_sampling_steps(self, steps):
    return self.cfg.replace(diffusion_sampling_steps=int(steps))

  def sample(self, head_params, h_xD, noise):
    """Ancestral DDPM over the respaced steps; ``noise [..., R, L]`` (module docstring)."""
    net, p = self._net(), {"params": head_params["net"]}
    tab, timestep_map = respaced(self.steps)
    c = net.apply(p, h_xD, method="condition")
    l = self.cfg.latent_size

    def step(k, x):
      i = self.steps - 1 - k                         # spaced index, R-1 .. 0
      t = jnp.asarray(timestep_map)[i]
      out = net.apply(p, x, t, c, method="denoise").astype(jnp.float32)
      mean, log_var = _model_mean_logvar(tab, x, i, out[..., :l], out[..., l:])
      z = jax.lax.dynamic_index_in_dim(noise, jnp.minimum(k + 1, self.steps - 1), axis=-2, keepdims=False)
      nonzero = (i != 0).astype(jnp.float32)
      return mean + nonzero * jnp.exp(0.5 * log_var) * z

    return jax.lax.fori_loop(0, self.steps, step, noise[..., 0, :].astype(jnp.float32))

  def replicate_losses(self, head_params, h_xD, x0_xL, t_x, noise_xL):
    """Per-replicate hybrid loss (``mse + vb``) for given targets, timesteps and noise."""
    x_t = q_sample(x0_xL, t_x, noise_xL)
    out = self.module().apply({"params": head_params}, x_t, t_x, h_xD).astype(jnp.float32)
    mse, vb = hybrid_loss_terms(out, x0_xL, t_x, noise_xL)
    return mse + vb

  def row_losses(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows_B):
    cfg = self.cfg
    s, l, n = h_BxSxD.shape[1], cfg.latent_size, cfg.num_samples

    def draw(k):
      k_post, k_t, k_noise = jax.random.split(k, 3)
      return (jax.random.normal(k_post, (n, s, l), jnp.float32),
              jax.random.randint(k_t, (n, s), 0, NUM_TIMESTEPS),
              jax.random.normal(k_noise, (n, s, l), jnp.float32))

    eps, t, noise = base.row_draws(key, rows_B, draw)                 # N x B x S x (L)
    mean = jax.lax.stop_gradient(mean_BxSxL.astype(jnp.float32))
    std = jnp.exp(jax.lax.stop_gradient(log_std_BxSxL.astype(jnp.float32)))
    x0 = mean[None] + eps * std[None]                                 # one posterior draw per replicate
    return jnp.mean(self.replicate_losses(head_params, h_BxSxD[None], x0, t, noise), axis=0)

  def param_counts(self):
    return adaln_mlp.param_counts(self.cfg, self.out_channels)

  def forward_flops(self, num_samples, train, convention="factored"):
    base.check_convention(convention)
    return adaln_mlp.forward_flops(self.cfg, self.out_channels, num_samples,
                                   1 if train else self.network_calls,
                                   train, convention)

  def activation_bytes(self, bytes_per_element):
    return adaln_mlp.activation_bytes(self.cfg, self.out_channels, bytes_per_element)

  reference_class = "DiffusionTransformer"

  def reference_layout(self):
    return adaln_mlp.reference_layout(self.cfg)

  @classmethod
  def in_state_dict(cls, sd, prefix, latent_size):
    return adaln_mlp.output_channels_in_state_dict(sd, prefix) == 2 * latent_size
