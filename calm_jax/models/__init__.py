"""Model construction, parameter initialisation and the per-model loss functions.

The three model kinds:
  ``autoencoder``  :class:`calm_jax.models.autoencoder.Autoencoder`   (AutoencoderConfig)
  ``energy``       :class:`calm_jax.models.calm.EnergyModel`         (EnergyConfig; CALM with the
                   generative head ``cfg.head``: :mod:`calm_jax.models.heads`)
  ``transformer``  :class:`calm_jax.models.transformer.TransformerLM`  (TransformerConfig)

Parameters are plain pytrees of arrays (``init_params`` strips flax's
partitioning boxes); their logical axis names come from ``logical_axes`` and
are mapped onto a mesh by :mod:`calm_jax.parallel.sharding`.  Loss functions are pure:
``(params, batch, key) -> (loss, metrics)``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import AutoencoderConfig, EnergyConfig, TransformerConfig
from calm_jax.models import heads, layers, losses
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.calm import EnergyModel, sample_noise  # noqa: F401  (sample_noise: re-exported)
from calm_jax.models.transformer import TransformerLM

KINDS = ("autoencoder", "energy", "transformer")
Params = Any


def build(cfg):
  """The flax module for a model config."""
  if isinstance(cfg, AutoencoderConfig):
    return Autoencoder(cfg)
  if isinstance(cfg, EnergyConfig):
    return EnergyModel(cfg)
  if isinstance(cfg, TransformerConfig):
    return TransformerLM(cfg)
  raise TypeError(f"no model for config type {type(cfg).__name__}")


def _example_inputs(cfg):
  if isinstance(cfg, AutoencoderConfig):
    return (jnp.zeros((1, cfg.patch_size), jnp.int32),)
  if isinstance(cfg, EnergyConfig):
    k = cfg.patch_size
    return (jnp.zeros((1, 2 * k), jnp.int32), jnp.zeros((1, 1, 1) + heads.get(cfg).noise_shape, jnp.float32))
  return (jnp.zeros((1, 2), jnp.int32),)


def _boxed_init(cfg, key):
  return build(cfg).init(key, *_example_inputs(cfg))["params"]


def _is_box(x):
  return isinstance(x, nn.Partitioned)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg, key) -> Params:
  """Fresh parameters (fp32 unless ``param_dtype`` says otherwise), unboxed.

  Not flax's ``init``: that derives a key and draws for every parameter, and on
  XLA:CPU each random draw compiles to a loop of a dozen kernels.  With the test
  suite's fast-compile flags a tiny CALM's init compiled in ~12 s that way and ~5 s
  this way (2-core VM; with XLA's default flags ~26 s either way).  Here the
  parameters' shapes, axes and initialisers come from one abstract trace
  (:func:`_abstract_boxed`), and the ``N(0, std^2)`` parameters are drawn in
  groups -- one draw per (shape, dtype, logical axes), stacked on a new leading
  axis and split -- from one key each.  Same distribution as the reference's
  ``post_init``; draws are independent of any sharding (threefry is
  partitionable), and a group's members share their sharding.
  """
  boxes, treedef = jax.tree.flatten(_abstract_boxed(cfg), is_leaf=_is_box)
  groups: dict[tuple, list[int]] = {}
  values = [None] * len(boxes)
  for i, b in enumerate(boxes):
    if b.init.kind in ("normal", "uniform"):
      # The key has the kind only for uniform draws: the normal groups (all of the energy head's
      # and the backbone's) keep their keys and values.
      kind = () if b.init.kind == "normal" else ("uniform",)
      groups.setdefault((b.value.shape, b.value.dtype, b.names) + kind, []).append(i)
    else:
      values[i] = b.init(None, b.value.shape, b.value.dtype)
  for key_g, ((shape, dtype, *rest), idx) in zip(jax.random.split(key, max(len(groups), 1)), groups.items()):
    if rest and rest[-1] == "uniform":   # U[-1, 1], scaled per parameter by its bound (xavier_uniform)
      draw = jax.random.uniform(key_g, (len(idx),) + shape, dtype, -1.0, 1.0)
    else:
      draw = jax.random.normal(key_g, (len(idx),) + shape, dtype)
    for j, i in enumerate(idx):
      values[i] = (boxes[i].init.std * draw[j]).astype(dtype)
  return jax.tree.unflatten(treedef, values)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg):
  """The boxed abstract init of a (frozen, hashable) config: shapes, dtypes, logical axes and
  initialisers (:class:`calm_jax.models.layers.Param`).  One trace per config and process, with the
  initialisers' draws skipped (:func:`calm_jax.models.layers.shapes_only`)."""
  with layers.shapes_only():
    return jax.eval_shape(lambda k: _boxed_init(cfg, k), jax.random.key(0))


def abstract_params(cfg) -> Params:
  """Shapes and dtypes of the parameters without allocating them (a fresh tree on each call)."""
  return nn.unbox(_abstract_boxed(cfg))


def logical_axes(cfg) -> Params:
  """A pytree like the parameters whose leaves are tuples of logical axis names."""
  return nn.get_partition_spec(_abstract_boxed(cfg))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------- loss functions


def autoencoder_loss_fn(cfg: AutoencoderConfig, params, tokens_BxT, key, train: bool = True):
  """VAE loss of the autoencoder on a batch of token blocks (T a multiple of K)."""
  out = Autoencoder(cfg).apply({"params": params}, tokens_BxT, key=key, train=train)
  return losses.autoencoder_loss(out, tokens_BxT, cfg, train=train)


def encode_targets(ae_cfg: AutoencoderConfig, ae_params, tokens_BxT):
  """The frozen autoencoder's posterior (mean, log_std) of every chunk, no gradient."""
  mean, log_std = Autoencoder(ae_cfg).apply({"params": ae_params}, tokens_BxT, method="encode")
  return jax.lax.stop_gradient(mean), jax.lax.stop_gradient(log_std)


def target_mask(mask_BxT, patch_size: int):
  """``[B, S-1]``: a target chunk counts when its first token is real (the reference's ``patch_mask``)."""
  b, t = mask_BxT.shape
  k = patch_size
  return mask_BxT[:, k:].reshape(b, t // k - 1, k)[:, :, 0]


def energy_loss_fn(cfg: EnergyConfig, ae_cfg: AutoencoderConfig, params, ae_params, tokens_BxT, key,
                   mask_BxT=None, pairwise: str = "gram"):
  """CALM's training loss on a block of T = S*K tokens, for any generative head.

  The model reads chunks 0..S-2 and predicts chunks 1..S-1: the head's loss
  (:meth:`calm_jax.models.heads.base.GenerativeHead.loss`; the energy head: N head
  samples per position, fresh noise each, scored against M samples of the frozen
  autoencoder's posterior of the true chunk) averaged over the target chunks.
  ``ae_params`` is an explicit argument, outside any optimiser: the autoencoder
  is frozen.  ``pairwise``: the energy head's distance form (other heads ignore it).
  """
  k = cfg.patch_size
  mean, log_std = encode_targets(ae_cfg, ae_params, tokens_BxT[:, k:])          # B x (S-1) x L
  h_BxSxD, _ = EnergyModel(cfg).apply({"params": params}, tokens_BxT[:, :-k], method="hidden")
  mask = None if mask_BxT is None else target_mask(mask_BxT, k)
  return heads.get(cfg, pairwise=pairwise).loss(params["generative_head"], h_BxSxD, mean, log_std, key, mask)


def transformer_loss_fn(cfg: TransformerConfig, params, tokens_BxT, key=None, mask_BxT=None):
  """Next-token cross-entropy of the discrete baseline."""
  del key
  # Logits for the T - 1 predicting positions only, from the final hidden states and the head's
  # kernel: slicing [B, T, V] logits after the head copied them (0.15-0.29 s of the medium
  # benchmark step at V = 8192); large V: projected in vocabulary blocks, no [B, T, V] at all.
  h, w = TransformerLM(cfg).apply({"params": params}, tokens_BxT, method="hidden_and_head")
  mask = None if mask_BxT is None else mask_BxT[:, 1:]
  loss, _ = losses.projected_cross_entropy(h[:, :-1], w, tokens_BxT[:, 1:], mask, layout="dv")
  return loss, {"loss": loss, "ce": loss}
