"""The flow-matching head (the reference's ``FlowLoss`` in ``FlowTransformer``).

Dimension legend: B batch, S positions, D width, L latent, N training
replicates / samples per position.

Convention: t = 0 is noise, t = 1 data (rectified flow).  Training, per
replicate: t ~ U[0, 1) (fp32), x0 ~ N(0, I), ``x_t = (1 - t) x0 + t z`` for the
posterior draw z of the target, velocity target ``z - x0``, loss = mean_L
squared error; no time weighting.  The network sees ``floor(1000 t)`` (the
reference's ``(t * 1000).long()``: time quantised to 1e-3, in fp32).

Sampling: x ~ N(0, I) (the whole noise of a sample: ``[L]``), then
``cfg.flow_sampling_steps`` steps of ``cfg.flow_solver`` with t_k = k / steps:
midpoint (the reference's: ``x += dt f(x + dt/2 f(x, t), t + dt/2)``, two
network calls a step) or Euler (one).  Deterministic given the noise.  Default
10 midpoint steps = 20 network calls, as the reference's code (``num_steps = 20``
halved for midpoint); the paper's §7.4 text says 100 steps -- set
``flow_sampling_steps`` for that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.configs import EnergyConfig
from calm_jax.models.heads import adaln_mlp, base

TIME_SCALE = 1000


def quantised_time(t):
  """``floor(1000 t)`` computed in fp32, as the reference's ``(t * 1000).long()`` (t >= 0)."""
  return jnp.floor(jnp.asarray(t, jnp.float32) * jnp.float32(TIME_SCALE)).astype(jnp.int32)


class Flow(base.GenerativeHead):
  name = "flow"

  def __init__(self, cfg: EnergyConfig, **options):
    super().__init__(cfg, **options)
    self.steps, self.solver = cfg.flow_sampling_steps, cfg.flow_solver
    self.noise_shape = (cfg.latent_size,)

  def module(self):
    return adaln_mlp.NetHead(self.cfg, self.cfg.latent_size)

  def init_call(self, module, h_xD, noise):
    return module(noise, jnp.zeros(noise.shape[:-1], jnp.int32), h_xD)

  def _net(self):
    return adaln_mlp.AdaLNMLP(self.cfg, self.cfg.latent_size)

  def noise(self, key, shape):
    return jax.random.normal(key, tuple(shape) + self.noise_shape, jnp.float32)

  @property
  def network_calls(self) -> int:
    return self.steps * (2 if self.solver == "midpoint" else 1)

  def with_sampling_steps(self, steps):
    return self.cfg.replace(flow_sampling_steps=int(steps))

  def sample(self, head_params, h_xD, noise):
    net, p = self._net(), {"params": head_params["net"]}
    c = net.apply(p, h_xD, method="condition")
    n = self.steps
    dt = 1.0 / n
    f = lambda x, t: net.apply(p, x, quantised_time(t), c, method="denoise").astype(jnp.float32)

    # t_k = k / n rounded to fp32 from the exact quotient, as torch.full((B,), k / n) does.
    times = jnp.asarray(np.array([k / n for k in range(n)], np.float32))

    def step(k, x):
      t = times[k]
      if self.solver == "midpoint":
        x_mid = x + np.float32(0.5 * dt) * f(x, t)
        return x + np.float32(dt) * f(x_mid, t + np.float32(0.5 * dt))
      return x + np.float32(dt) * f(x, t)

    return jax.lax.fori_loop(0, n, step, noise.astype(jnp.float32))

  def replicate_losses(self, head_params, h_xD, z_xL, t_x, x0_xL):
    """Per-replicate squared velocity error for given targets z, times t in [0, 1) and noise x0."""
    t = t_x[..., None]
    x_t = (1 - t) * x0_xL + t * z_xL
    v = self.module().apply({"params": head_params}, x_t, quantised_time(t_x), h_xD).astype(jnp.float32)
    return jnp.mean(jnp.square(v - (z_xL - x0_xL)), axis=-1)

  def row_losses(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows_B):
    cfg = self.cfg
    s, l, n = h_BxSxD.shape[1], cfg.latent_size, cfg.num_samples

    def draw(k):
      k_post, k_t, k_x0 = jax.random.split(k, 3)
      return (jax.random.normal(k_post, (n, s, l), jnp.float32), jax.random.uniform(k_t, (n, s), jnp.float32),
              jax.random.normal(k_x0, (n, s, l), jnp.float32))

    eps, t, x0 = base.row_draws(key, rows_B, draw)                    # N x B x S x (L)
    mean = jax.lax.stop_gradient(mean_BxSxL.astype(jnp.float32))
    std = jnp.exp(jax.lax.stop_gradient(log_std_BxSxL.astype(jnp.float32)))
    z = mean[None] + eps * std[None]
    return jnp.mean(self.replicate_losses(head_params, h_BxSxD[None], z, t, x0), axis=0)

  def param_counts(self):
    return adaln_mlp.param_counts(self.cfg, self.cfg.latent_size)

  def forward_flops(self, num_samples, train, convention="factored"):
    base.check_convention(convention)
    return adaln_mlp.forward_flops(self.cfg, self.cfg.latent_size, num_samples,
                                   1 if train else self.network_calls, train, convention)

  def activation_bytes(self, bytes_per_element):
    return adaln_mlp.activation_bytes(self.cfg, self.cfg.latent_size, bytes_per_element)

  reference_class = "FlowTransformer"

  def reference_layout(self):
    return adaln_mlp.reference_layout(self.cfg)

  @classmethod
  def in_state_dict(cls, sd, prefix, latent_size):
    return adaln_mlp.output_channels_in_state_dict(sd, prefix) == latent_size
