"""Pure train and eval steps for the three model kinds (one loop drives them all: ``train.py``).

Dimension legend: B batch, T tokens, S = T/K chunks, K tokens per chunk, L latent, V vocabulary.

The train state is a plain dict (the checkpoint contract)::

  {'step': int32 [], 'params': <model params>, 'opt_state': <optax state>}

``train_step(state, batch, base_key, ae_params=None) -> (state, metrics)``:
  * randomness is ``jax.random.fold_in(base_key, state['step'])`` (then folded
    with the micro-batch index), so a resumed run draws exactly the numbers an
    uninterrupted one would;
  * gradient accumulation splits the step's batch into ``grad_accum_steps``
    micro-batches inside the one jitted step (``optim.accumulate_gradients``),
    instead of ``optax.MultiSteps``: one optimizer update per step, no extra
    copy of the gradients in the optimizer state;
  * CALM's autoencoder parameters arrive as an explicit argument, outside the
    optimiser and without gradient: the autoencoder is frozen (stage 1 made it);
  * metrics are device scalars named ``train/...``, fetched by the loop one
    step late.

``eval_step(params, batch, key, ae_params=None) -> sums`` returns numerators and
denominators (``{name: (sum, count)}``) so that held-out metrics over many
batches (and padding rows, ``batch['row_mask']``) are exact means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from calm_jax import models
from calm_jax.configs import AutoencoderConfig
from calm_jax.models import losses
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.parallel import sharded_losses
from calm_jax.training import optim

PyTree = Any
State = dict[str, Any]


def make_optimizer(optim_cfg: optim.OptimConfig) -> optax.GradientTransformation:
  """The optax chain of ``optim_cfg``; accumulation is done in the step, not by MultiSteps."""
  return optim.make_optimizer(dataclasses.replace(optim_cfg, grad_accum_steps=1))


def init_state(cfg, tx: optax.GradientTransformation, key) -> State:
  """A fresh train state (params initialised from ``key``)."""
  params = models.init_params(cfg, key)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def loss_fn(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None, mesh=None) -> Callable:
  """``f(params, tokens_BxT, key, ae_params) -> (loss, metrics)`` for a kind (training mode).

  CALM (kind 'energy') trains whichever generative head ``cfg.head`` names.  With a
  ``mesh``, its loss draws (and, for the energy head, compares) its samples per device
  under ``jax.shard_map`` (:func:`calm_jax.parallel.sharded_losses.sharded_energy_loss_fn`).
  """
  if kind == "autoencoder":
    return lambda p, tokens, key, ae_params: models.autoencoder_loss_fn(cfg, p, tokens, key, train=True)
  if kind == "energy":
    if ae_cfg is None:
      raise ValueError("loss_fn: kind 'energy' needs the autoencoder's config")
    if mesh is not None:
      sharded = sharded_losses.sharded_energy_loss_fn(cfg, ae_cfg, mesh)
      return lambda p, tokens, key, ae_params: sharded(p, ae_params, tokens, key)
    return lambda p, tokens, key, ae_params: models.energy_loss_fn(cfg, ae_cfg, p, ae_params, tokens, key)
  if kind == "transformer":
    return lambda p, tokens, key, ae_params: models.transformer_loss_fn(cfg, p, tokens)
  raise ValueError(f"kind must be one of {models.KINDS}, got {kind!r}")


def make_train_step(kind: str, cfg, optim_cfg: optim.OptimConfig, tx: optax.GradientTransformation, *,
                    ae_cfg: AutoencoderConfig | None = None, mesh=None) -> Callable:
  """The pure step of ``kind``: ``(state, batch, base_key, ae_params=None) -> (state, metrics)``.

  ``batch['tokens']`` is the whole global batch of the step (int32 [B, T]);
  it is split into ``optim_cfg.grad_accum_steps`` micro-batches.  ``mesh``: the
  device mesh the step is jitted for (see :func:`loss_fn`).
  """
  f = loss_fn(kind, cfg, ae_cfg, mesh)
  schedule = optim.make_schedule(optim_cfg)
  num_micro = optim_cfg.grad_accum_steps

  def train_step(state: State, batch: dict, base_key, ae_params: PyTree = None):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)
    if ae_params is not None:
      # Frozen: no gradient can reach it even if a loss forgot its stop_gradient.
      ae_params = jax.lax.stop_gradient(ae_params)
    micro_loss = lambda p, tokens, k: f(p, tokens, k, ae_params)
    (loss, aux), grads = optim.accumulate_gradients(micro_loss, state["params"], batch["tokens"], num_micro,
                                                    rng=key, has_aux=True)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {f"train/{k}": v for k, v in aux.items()}
    metrics["train/loss"] = loss
    metrics["train/grad_norm"] = optax.global_norm(grads)
    metrics["train/learning_rate"] = schedule(step)
    return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


# --------------------------------------------------------------------------- evaluation


def _sum_count(values_x, mask_x):
  m = mask_x.astype(jnp.float32)
  return jnp.sum(values_x.astype(jnp.float32) * m), jnp.sum(m)


def autoencoder_eval_step(cfg: AutoencoderConfig, pad_id: int, noise_sigma: float) -> Callable:
  """Token accuracy of reconstructions from the posterior mean, clean and noisy.

  ``token_acc``: argmax of decode(mean) against the input; ``token_acc_noisy``:
  decode(mean + sigma * eps) with a fixed ``sigma`` (robustness of the latent
  space, CALM_NOTES §1.4); ``token_acc_posterior``: decode(mean + exp(log_std) * eps),
  the posterior sample CALM is trained against; ``ce``: cross-entropy of the
  clean reconstruction.  PAD tokens (alignment filler) and padding rows are not counted.
  """
  model = Autoencoder(cfg)

  def eval_step(params, batch, key, ae_params=None):
    del ae_params
    tokens_BxT = batch["tokens"]
    b, t = tokens_BxT.shape
    mask_BxT = batch["row_mask"][:, None] & (tokens_BxT != pad_id)
    mean_BxSxL, log_std_BxSxL = model.apply({"params": params}, tokens_BxT, method="encode")
    k_noise, k_post = jax.random.split(key)

    def nll_correct(z_BxSxL):   # projected in vocabulary blocks at large V (losses.projected_token_nll)
      h, e = model.apply({"params": params}, z_BxSxL, method="decode_hidden")
      return losses.projected_token_nll(h.reshape(b, t, -1), e, tokens_BxT)

    nll_BxT, clean = nll_correct(mean_BxSxL)
    eps = jax.random.normal(k_noise, mean_BxSxL.shape, jnp.float32)
    _, noisy = nll_correct(mean_BxSxL + noise_sigma * eps.astype(mean_BxSxL.dtype))
    eps = jax.random.normal(k_post, mean_BxSxL.shape, jnp.float32)
    _, post = nll_correct(mean_BxSxL + jnp.exp(log_std_BxSxL) * eps.astype(mean_BxSxL.dtype))
    return {"token_acc": _sum_count(clean, mask_BxT),
            "token_acc_noisy": _sum_count(noisy, mask_BxT),
            "token_acc_posterior": _sum_count(post, mask_BxT),
            "ce": _sum_count(nll_BxT, mask_BxT)}

  return eval_step


def energy_eval_step(cfg, ae_cfg: AutoencoderConfig, mesh=None) -> Callable:
  """CALM's held-out head loss (the training objective, without dropout of any kind), reported as
  ``{head}_loss`` (``energy_loss``, ``diffusion_loss``, ``flow_loss``).

  With a ``mesh`` the samples are drawn per device, as in training (:func:`loss_fn`).
  """
  if mesh is not None:
    sharded = sharded_losses.sharded_energy_loss_fn(cfg, ae_cfg, mesh)
    energy = lambda p, a, tokens, key, mask: sharded(p, a, tokens, key, mask)
  else:
    energy = lambda p, a, tokens, key, mask: models.energy_loss_fn(cfg, ae_cfg, p, a, tokens, key, mask)

  def eval_step(params, batch, key, ae_params=None):
    tokens_BxT = batch["tokens"]
    b, t = tokens_BxT.shape
    mask_BxT = jnp.broadcast_to(batch["row_mask"][:, None], (b, t))
    loss, _ = energy(params, ae_params, tokens_BxT, key, mask_BxT)
    # energy_loss_fn averages over the predicted chunks 1..S-1 of the real rows.
    count = jnp.sum(batch["row_mask"].astype(jnp.float32)) * (t // cfg.patch_size - 1)
    return {f"{cfg.head}_loss": (loss * count, count)}

  return eval_step


def transformer_eval_step(cfg) -> Callable:
  """The baseline's held-out next-token cross-entropy (nats per token)."""

  def eval_step(params, batch, key, ae_params=None):
    del key, ae_params
    tokens_BxT = batch["tokens"]
    b, t = tokens_BxT.shape
    mask_BxT = jnp.broadcast_to(batch["row_mask"][:, None], (b, t))
    loss, _ = models.transformer_loss_fn(cfg, params, tokens_BxT, mask_BxT=mask_BxT)
    count = jnp.sum(batch["row_mask"].astype(jnp.float32)) * (t - 1)
    return {"ce": (loss * count, count)}

  return eval_step


def make_eval_step(kind: str, cfg, *, ae_cfg: AutoencoderConfig | None = None, pad_id: int = -1,
                   noise_sigma: float = 0.3, mesh=None) -> Callable:
  """``eval_step(params, batch, key, ae_params=None) -> {name: (sum, count)}`` for a kind."""
  if kind == "autoencoder":
    return autoencoder_eval_step(cfg, pad_id, noise_sigma)
  if kind == "energy":
    return energy_eval_step(cfg, ae_cfg, mesh)
  if kind == "transformer":
    return transformer_eval_step(cfg)
  raise ValueError(f"kind must be one of {models.KINDS}, got {kind!r}")


def finish_eval(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
  """``{name: (sum, count)}`` on the host -> ``{'eval/name': mean}`` (plus perplexity for CE)."""
  out = {}
  for name, (total, count) in sums.items():
    out[f"eval/{name}"] = float(total) / max(float(count), 1.0)
  if "eval/ce" in out:
    out["eval/perplexity"] = float(jnp.exp(min(out["eval/ce"], 50.0)))
  out["eval/count"] = max(float(c) for _, c in sums.values())
  return out

