"""Per-device sampling under ``jax.shard_map``: CALM's head loss and BrierLM's samples, for any head.

Dimension legend: B batch, T tokens, K chunk size, S = T/K chunks, D width,
L latent, E noise size, N model samples, M posterior (target) samples,
P = B*(S-1) positions; a ``_loc`` suffix means this device's rows.

Why shard_map here.  The energy loss draws N head samples and M posterior
samples per position and compares all N*(N-1) + N*M pairs.  Written as one
global jitted function, XLA is free to move those [N, P, L] / [M, P, L] tensors
across devices.  Under ``jax.shard_map`` over the batch axes (``data``,
``fsdp``) every device draws and compares the samples of its own rows, next to
their hidden states, and only two reduced scalars per device (the masked loss
sum and the position count) cross devices, via ``psum``.  The backbone and the
frozen autoencoder's encoder run outside, under the usual sharding
propagation, with parameters sharded by the rules table
(:mod:`calm_jax.parallel.sharding`); the ``tensor`` axis stays automatic inside the
shard_map, so the head can stay tensor-parallel.

Randomness is per *row*, not per device: row ``r`` of the global batch draws
its noise from ``fold_in(k_noise, r)`` and its posterior samples from
``fold_in(k_target, r)`` where ``r = axis_index(('data', 'fsdp')) * B_loc + i``.
So the loss is the same on every mesh (and on one device) for the same key —
which is what makes the sharded-vs-single-device test exact.  The draws differ
from :func:`calm_jax.models.energy_loss_fn` (which splits one key over the whole
batch) but have the same distribution: the same estimator, the same semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, EnergyConfig
from calm_jax.evaluation import brier
from calm_jax.models import heads, losses, rng
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.calm import EnergyModel
from calm_jax.models.heads.base import row_keys  # noqa: F401  (re-exported)
from calm_jax.parallel.sharding import BATCH_AXES


def row_noise(cfg: EnergyConfig, key, rows_B, num_positions: int, num_samples: int):
  """Head noise ``[num_samples, B, num_positions, *noise_shape]`` drawn per row from ``fold_in(key, row)``
  (``noise_shape``: the head's, e.g. ``(E,)`` for the energy head)."""
  head = heads.get(cfg)
  return heads.base.row_draws(key, rows_B, lambda k: head.noise(k, (num_samples, num_positions)))


def row_posterior_eps(cfg: EnergyConfig, key, rows_B, num_positions: int):
  """Standard-normal draws ``[M, B, num_positions, L]`` per row; posterior = mean + std * eps."""
  draw = lambda k: rng.normal(k, (cfg.num_target_samples, num_positions, cfg.latent_size), jnp.float32)
  return jnp.swapaxes(jax.vmap(draw)(row_keys(key, rows_B)), 0, 1)


def _local_rows(b_loc: int):
  """Global row indices of this device's batch rows (call inside the shard_map)."""
  shard = jax.lax.axis_index(BATCH_AXES)
  return shard * b_loc + jnp.arange(b_loc)


def _manual_axes(mesh):
  return frozenset(BATCH_AXES)


def sharded_energy_loss_fn(cfg: EnergyConfig, ae_cfg: AutoencoderConfig, mesh, pairwise: str = "gram"):
  """:func:`calm_jax.models.energy_loss_fn` with ``cfg``/``ae_cfg`` bound, sampling per device (any head).

  Returns ``loss_fn(params, ae_params, tokens_BxT, key, mask_BxT=None) -> (loss, metrics)``,
  to be called inside ``jit`` with the batch sharded by
  :func:`calm_jax.parallel.sharding.batch_sharding` (B divisible by data*fsdp).  The loss
  is the masked mean over positions of the head's per-position loss
  (:meth:`~calm_jax.models.heads.base.GenerativeHead.row_losses`; the energy head: the
  negative energy score), as in ``models.energy_loss_fn``; randomness is per row (module docstring).
  """
  k = cfg.patch_size
  batch_spec = P(BATCH_AXES)
  head = heads.get(cfg, pairwise=pairwise)

  def per_device(head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, mask_BxS, key):
    rows = _local_rows(h_BxSxD.shape[0])
    loss = head.row_losses(head_params, h_BxSxD, mean_BxSxL, log_std_BxSxL, key, rows).reshape(-1)
    m = mask_BxS.reshape(-1).astype(jnp.float32)
    # Only these two scalars leave the device.
    return jax.lax.psum(jnp.sum(loss * m), BATCH_AXES), jax.lax.psum(jnp.sum(m), BATCH_AXES)

  mapped = jax.shard_map(
      per_device, mesh=mesh, axis_names=_manual_axes(mesh),
      in_specs=(P(), batch_spec, batch_spec, batch_spec, batch_spec, P()), out_specs=(P(), P()))

  def loss_fn(params, ae_params, tokens_BxT, key, mask_BxT=None):
    b, t = tokens_BxT.shape
    s = t // k
    mean, log_std = models.encode_targets(ae_cfg, ae_params, tokens_BxT[:, k:])   # B x (S-1) x L
    h_BxSxD, _ = EnergyModel(cfg).apply({"params": params}, tokens_BxT[:, :-k], method="hidden")
    if mask_BxT is None:
      mask = jnp.ones((b, s - 1), jnp.float32)
    else:  # a target chunk counts when its first token is real (as models.energy_loss_fn)
      mask = models.target_mask(mask_BxT, k).astype(jnp.float32)
    total, count = mapped(params["generative_head"], h_BxSxD, mean, log_std, mask, key)
    loss = total / jnp.maximum(count, 1.0)
    return loss, head.metrics(loss)

  return loss_fn


def reference_energy_loss(cfg: EnergyConfig, ae_cfg: AutoencoderConfig, params, ae_params, tokens_BxT, key,
                          mask_BxT=None, pairwise: str = "gram"):
  """Unsharded loss with the per-row draws of :func:`sharded_energy_loss_fn`: what the sharded loss must
  equal.  The energy head's is built from the plain pieces (``EnergyModel.__call__``,
  ``losses.energy_loss``); another head's from its ``row_losses`` on the whole batch."""
  k = cfg.patch_size
  b, t = tokens_BxT.shape
  s = t // k
  rows = jnp.arange(b)
  mean, log_std = models.encode_targets(ae_cfg, ae_params, tokens_BxT[:, k:])
  mask = None if mask_BxT is None else models.target_mask(mask_BxT, k)
  head = heads.get(cfg, pairwise=pairwise)
  if cfg.head != "energy":
    h_BxSxD, _ = EnergyModel(cfg).apply({"params": params}, tokens_BxT[:, :-k], method="hidden")
    per_position = head.row_losses(params["generative_head"], h_BxSxD, mean, log_std, key, rows)
    loss = heads.base.masked_mean(per_position,
                                  mask)
    return loss, head.metrics(loss)
  k_noise, k_target = jax.random.split(key)
  preds = EnergyModel(cfg).apply({"params": params}, tokens_BxT, row_noise(cfg, k_noise, rows, s - 1,
                                                                           cfg.num_samples))
  eps = row_posterior_eps(cfg, k_target, rows, s - 1)
  y = mean[None] + jnp.exp(log_std)[None] * eps
  p = b * (s - 1)
  loss = losses.energy_loss(preds.reshape(cfg.num_samples, p, -1), y.reshape(-1, p, cfg.latent_size),
                            cfg.beta, None if mask is None else mask.reshape(p), pairwise)
  return loss, head.metrics(loss)


# --------------------------------------------------------------------------- BrierLM


def sharded_head_samples_fn(cfg: EnergyConfig, mesh, num_samples: int = 2):
  """Per-device head sampling (any head): ``fn(head_params, h_BxSxD, key) -> z [num_samples, B, S, L]``.

  The samples are drawn on the device that holds their hidden states and stay
  there (the output is sharded over the batch like ``h``); noise is per row.
  """
  spec = P(BATCH_AXES)
  head = heads.get(cfg)

  def per_device(head_params, h_BxSxD, key):
    b_loc, s = h_BxSxD.shape[:2]
    noise = row_noise(cfg, key, _local_rows(b_loc), s, num_samples)
    return head.sample(head_params, h_BxSxD[None], noise)

  return jax.shard_map(per_device, mesh=mesh, axis_names=_manual_axes(mesh),
                       in_specs=(P(), spec, P()), out_specs=P(None, BATCH_AXES))


def sharded_calm_brier_rows_fn(cfg: EnergyConfig, ae_cfg: AutoencoderConfig, mesh):
  """Teacher-forced two-sample Brier-1..4 of CALM with K >= 4 (the reference's ``eval_brier``), per row.

  Returns ``fn(params, ae_params, tokens_BxT, key) -> sums_Bx4``: each row's sum
  over its S - 1 predicted chunk positions (divide by S - 1, or feed
  :meth:`calm_jax.evaluation.brier.BrierAccumulator.update_rows`).  At every chunk
  position two head samples are drawn on the device that holds the position's
  hidden state (:func:`sharded_head_samples_fn`, noise per global row), decoded
  by the frozen autoencoder and argmaxed there; only the per-row sums leave
  the device (the output is sharded over the batch).  The backbone runs
  outside the shard_map under the rules table's parameter shardings.  K < 4
  needs an autoregressive rollout (``calm_jax.evaluation.evaluate``) and is refused here.
  """
  k = cfg.patch_size
  if k < brier.MAX_N:
    raise ValueError(f"sharded_calm_brier_rows_fn: model.patch_size={k} < {brier.MAX_N} needs a rollout "
                     "(calm_jax.evaluation.evaluate.evaluate_brier)")
  sample = sharded_head_samples_fn(cfg, mesh, 2)
  spec = P(BATCH_AXES)

  def per_device(ae_params, z_2xBxSxL, target_BxSxK):
    b_loc, s = target_BxSxK.shape[:2]
    preds = Autoencoder(ae_cfg).apply({"params": ae_params}, z_2xBxSxL.reshape(2 * b_loc, s, -1),
                                      method="decode_argmax").reshape(2, b_loc, s, k)
    return jnp.sum(brier.two_sample_brier(preds[0], preds[1], target_BxSxK), axis=1)   # B_loc x 4

  rows = jax.shard_map(per_device, mesh=mesh, axis_names=_manual_axes(mesh),
                       in_specs=(P(), P(None, BATCH_AXES), spec), out_specs=spec)

  def fn(params, ae_params, tokens_BxT, key):
    b, t = tokens_BxT.shape
    h_BxSxD, _ = EnergyModel(cfg).apply({"params": params}, tokens_BxT[:, :-k], method="hidden")
    z = sample(params["generative_head"], h_BxSxD, key)
    return rows(ae_params, z, tokens_BxT[:, k:].reshape(b, t // k - 1, k))

  return fn
