"""The generative-head interface: what CALM's model, losses, samplers and cost count ask of a head.

Dimension legend: B batch rows, S chunk positions, D width, L latent, N samples
(or training replicates) per position, P positions, E the head's noise per sample.

A head is two things:

* a flax module (``head.module()``), built inside
  :class:`calm_jax.models.calm.EnergyModel` under the name ``generative_head``;
  its parameters are ``params['generative_head']``;
* a :class:`GenerativeHead` object bound to the config, which owns everything
  the callers need and none of them asks which head it is:

  ``noise(key, shape)``   the randomness of one sample per entry of ``shape``
                          (``shape + noise_shape``); a sample is a *pure*
                          function of (hidden state, noise), so the same noise
                          gives the same latent on any mesh.
  ``sample(head_params, h, noise)``  latents ``noise.shape[:-len(noise_shape)] + (L,)``;
                          ``h`` (``[..., D]``) broadcasts against the noise's
                          leading axes (pass ``h[None]`` for a sample axis).
  ``loss(head_params, h_BxSxD, mean, log_std, key, mask_BxS)``  the training loss
                          (a masked mean over positions) and its metrics.
  ``row_losses(head_params, h_BxSxD, mean, log_std, key, rows_B)``  per-position
                          losses ``[B, S]`` with randomness per global row
                          (``fold_in(key, row)``): the per-device form
                          (:mod:`calm_jax.parallel.sharded_losses`).
  ``network_calls``       network evaluations per sample at inference (the
                          cost hook: inference FLOPs = per-call cost x calls).
  ``param_counts()``, ``forward_flops(num_samples, train, convention)``  the
                          analytic cost (:mod:`calm_jax.cost.flops`).
  ``with_sampling_steps(n)``  the config with ``n`` sampler steps (Fig. 9).

The table of implementations is :data:`calm_jax.models.heads.HEADS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import EnergyConfig, dtype_of

HEAD_CONVENTIONS = ("shared_cond", "reference", "factored")


def row_keys(key, rows_B):
  """One key per global row index: ``fold_in(key, row)``."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_B)


def row_draws(key, rows_B, draw):
  """``draw(row_key)`` for every row, with the row axis moved second: ``[n, B, ...]`` for draws
  ``[n, ...]`` (each leaf of a tuple of draws).  Row ``r``'s values depend only on ``(key, r)``,
  not on the batch it sits in."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), jax.vmap(draw)(row_keys(key, rows_B)))


def masked_mean(loss_BxS, mask_BxS=None):
  """Mean of per-position losses over the positions where ``mask`` is set (all when None)."""
  if mask_BxS is None:
    return jnp.mean(loss_BxS)
  m = mask_BxS.astype(jnp.float32)
  return jnp.sum(loss_BxS * m) / jnp.maximum(jnp.sum(m), 1.0)


class GenerativeHead:
  """A generative head bound to its config.  Subclasses implement the methods below."""
  name: ClassVar[str] = ""
  noise_shape: tuple = ()      # trailing axes of one sample's noise (set per instance)

  def __init__(self, cfg: EnergyConfig, **options: Any):
    """``options`` are head-specific settings (energy's ``pairwise``); a head ignores the ones it
    does not read, so callers can pass them without asking which head they hold."""
    del options
    self.cfg = cfg

  # ------------------------------------------------------------------ the module
  def module(self) -> nn.Module:
    """The flax module holding the head's parameters (``params['generative_head']``)."""
    raise NotImplementedError

  def init_call(self, module: nn.Module, h_xD, noise):
    """One network call of ``module`` inside the model's init (creates every parameter)."""
    raise NotImplementedError

  # ------------------------------------------------------------------ sampling
  def noise(self, key, shape) -> jax.Array:
    raise NotImplementedError

  def sample(self, head_params, h_xD, noise) -> jax.Array:
    raise NotImplementedError

  @property
  def network_calls(self) -> int:
    """Network evaluations per sample at inference."""
    raise NotImplementedError

  def with_sampling_steps(self, steps: int) -> EnergyConfig:
    raise ValueError(f"head {self.name!r} samples in one step; it has no step count")

  # ------------------------------------------------------------------ training
  def row_losses(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows_B) -> jax.Array:
    raise NotImplementedError

  def loss(self, head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, mask_BxS=None):
    """Masked mean of :meth:`row_losses` with rows 0..B-1 (a head may draw differently)."""
    rows = jnp.arange(h_BxSxD.shape[0])
    loss = masked_mean(self.row_losses(head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows), mask_BxS)
    return loss, self.metrics(loss)

  def metrics(self, loss) -> dict:
    return {"loss": loss, f"{self.name}_loss": loss}

  # ------------------------------------------------------------------ cost
  def param_counts(self) -> dict[str, int]:
    raise NotImplementedError

  def forward_flops(self, num_samples: int, train: bool, convention: str = "factored") -> float:
    """Forward FLOPs (matmuls) of the head at one position: ``num_samples`` samples (or training
    replicates) each costing :attr:`network_calls` network calls at inference, one in training."""
    raise NotImplementedError

  def activation_bytes(self, bytes_per_element: int) -> tuple[float, float]:
    """Training activations saved for the backward pass at one position, in bytes: ``(head, loss)``
    (:func:`calm_jax.cost.memory.plan`'s non-layer row)."""
    raise NotImplementedError

  # ------------------------------------------------------------------ interop (calm_jax.interop)
  reference_class: ClassVar[str] = ""          # the reference's model class (config.json "architectures")
  reference_twins: ClassVar[tuple] = ()        # other prefixes the reference registers the head under

  def reference_layout(self) -> list[tuple[tuple[str, ...], str, str]]:
    """``(path under params['generative_head'], reference key under 'generative_head.', kind)`` for every
    parameter module; kind is 'linear' (weight [out, in] + bias), 'norm' (weight) or 'norm_bias'."""
    raise NotImplementedError

  @classmethod
  def in_state_dict(cls, sd, prefix: str, latent_size: int) -> bool:
    """Whether a reference state dict holds this head under ``prefix`` ('generative_head')."""
    raise NotImplementedError

  # ------------------------------------------------------------------ shared helpers
  def _kw(self):
    b = self.cfg.backbone
    return dict(dtype=dtype_of(b.dtype), param_dtype=dtype_of(b.param_dtype))


def check_convention(convention: str):
  if convention not in HEAD_CONVENTIONS:
    raise ValueError(f"head_convention must be one of {HEAD_CONVENTIONS}, got {convention!r}")
