"""AdamW as the reference trains it, plus gradient accumulation and frozen parameters.

Reference settings (CALM_NOTES §1.3, §2.6): AdamW with b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1, global-norm clipping at 1.0, learning rate 3e-4.  The Hugging
Face Trainer excludes biases and norm weights from weight decay (the reference
registers ``LlamaRMSNorm`` as a layer norm) but *does* decay embeddings; the
mask built by :func:`decay_mask` reproduces that split from parameter paths.

Schedules:
  ``constant``         no warmup at all: what the released scripts effectively do,
                       because HF's ``"constant"`` scheduler ignores
                       ``--warmup_steps`` (CALM_NOTES §1.3 caveat).
  ``warmup_constant``  linear 0 -> peak over ``warmup_steps``, then constant
                       (HF ``constant_with_warmup``; the paper's wording).
  ``warmup_cosine``    linear warmup, then cosine decay to
                       ``final_lr_fraction * learning_rate`` at ``total_steps``.

Like HF's ``LambdaLR``, warmup starts at 0: the first update uses lr 0.

Public API:
  OptimConfig                       typed, validated settings
  make_schedule(cfg)                optax schedule: optimizer step -> learning rate
  decay_mask(params)                pytree of bools, True where weight decay applies
  path_mask(params, predicate)      pytree of bools from a predicate on path names
  make_optimizer(cfg, trainable=)   the full optax GradientTransformation
  accumulate_gradients(...)         micro-batch lax.scan with fp32 accumulation
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")

# Leaf names that never get weight decay: biases everywhere, and norm scales
# (the models name RMSNorm/LayerNorm parameters 'scale' and 'bias').
_NO_DECAY_LEAVES = frozenset({"bias", "scale"})
# A module whose name says it is a normalisation layer: 'norm', 'input_layernorm',
# 'RMSNorm_0', 'ln', 'ln_f', 'ln1', 'final_ln'.  '(^|_)ln' keeps 'kernel' or
# 'tlnx'-like names from matching by accident.
_NORM_MODULE = re.compile(r"norm|(^|_)ln(_|\d|$)", re.IGNORECASE)
# Attribute names under which boxed parameters (linen nn.Partitioned, nnx
# Variables) keep the array; they are not part of the parameter's name.
_BOX_ATTRS = frozenset({"value", "raw_value"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer settings; defaults are the reference's (CALM_NOTES §1.3, §2.6).

  Attributes:
    learning_rate: peak learning rate.
    schedule: one of ``SCHEDULES`` (see the module docstring).
    warmup_steps: linear warmup length in optimizer steps; must be 0 for
      ``constant`` (a silently ignored warmup is exactly the reference's trap).
    total_steps: optimizer steps of the whole run; required by ``warmup_cosine``.
    final_lr_fraction: cosine end value as a fraction of ``learning_rate``.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled decay, applied where :func:`decay_mask` is True.
    grad_clip_norm: global-norm clipping threshold; ``None`` disables it.
    grad_accum_steps: if > 1, wrap the optimizer in ``optax.MultiSteps`` so that
      every ``grad_accum_steps``-th call applies the mean gradient.  Prefer
      :func:`accumulate_gradients` inside one jitted step when the micro-batches
      are all available at once (no extra optimizer-state copy of the grads).
    mu_dtype: dtype of Adam's first moment (e.g. ``"bfloat16"``); ``None`` keeps
      the parameter dtype.
  """

  learning_rate: float = 3e-4
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int | None = None
  final_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float | None = 1.0
  grad_accum_steps: int = 1
  mu_dtype: str | None = None

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"OptimConfig.{field}: {why} (got {getattr(self, field)!r})")

    if self.schedule not in SCHEDULES:
      bad("schedule", f"must be one of {SCHEDULES}")
    if not self.learning_rate > 0:
      bad("learning_rate", "must be > 0")
    if self.warmup_steps < 0:
      bad("warmup_steps", "must be >= 0")
    if self.schedule == "constant" and self.warmup_steps:
      bad(
        "warmup_steps",
        "schedule 'constant' has no warmup (HF ignores it too); use schedule='warmup_constant' for a warmup",
      )
    if self.schedule == "warmup_cosine" and (
      self.total_steps is None or self.total_steps <= self.warmup_steps
    ):
      bad("total_steps", "warmup_cosine needs total_steps > warmup_steps")
    if self.total_steps is not None and self.total_steps <= 0:
      bad("total_steps", "must be > 0")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      bad("final_lr_fraction", "must be in [0, 1]")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        bad(name, "must be in [0, 1)")
    if not self.eps > 0:
      bad("eps", "must be > 0")
    if self.weight_decay < 0:
      bad("weight_decay", "must be >= 0")
    if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
      bad("grad_clip_norm", "must be > 0 or None")
    if self.grad_accum_steps < 1:
      bad("grad_accum_steps", "must be >= 1")
    if self.mu_dtype is not None:
      try:
        jnp.dtype(self.mu_dtype)
      except TypeError:
        bad("mu_dtype", "not a dtype name")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0 = first update)."""
  lr = cfg.learning_rate
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "warmup_constant":
    if cfg.warmup_steps == 0:
      return optax.constant_schedule(lr)
    return optax.warmup_constant_schedule(0.0, lr, cfg.warmup_steps)
  # warmup_cosine: optax's decay_steps counts the warmup too, like HF's
  # num_training_steps.  With warmup_steps == 0 optax would divide by zero.
  if cfg.warmup_steps == 0:
    return optax.cosine_decay_schedule(lr, cfg.total_steps, alpha=cfg.final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
    0.0, lr, cfg.warmup_steps, cfg.total_steps, end_value=cfg.final_lr_fraction * lr
  )


def _path_names(path) -> tuple[str, ...]:
  """Key path -> tuple of names, without the attribute that holds a boxed array."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    else:  # FlattenedIndexKey and friends
      names.append(str(k))
  while names and names[-1] in _BOX_ATTRS:
    names.pop()
  return tuple(names)


def path_mask(params: PyTree, predicate: Callable[[tuple[str, ...]], bool]) -> PyTree:
  """A pytree of bools with ``params``' structure: ``predicate(path_names)`` per leaf.

  ``path_names`` is e.g. ``('decoder', 'layers_0', 'mlp', 'gate_proj', 'kernel')``.
  Boxed parameters (linen ``nn.Partitioned``) are looked through.
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(predicate(_path_names(p))), params)


def is_decayed(names: Sequence[str]) -> bool:
  """True when the parameter at ``names`` gets weight decay (HF Trainer's rule)."""
  if not names:
    return True
  if names[-1] in _NO_DECAY_LEAVES:
    return False
  return not any(_NORM_MODULE.search(n) for n in names[:-1])


def decay_mask(params: PyTree) -> PyTree:
  """True for kernels and embeddings; False for biases and normalisation params."""
  return path_mask(params, is_decayed)


def make_optimizer(
  cfg: OptimConfig, trainable: PyTree | Callable[[PyTree], PyTree] | None = None
) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW(masked decay), optionally MultiSteps and frozen params.

  Args:
    cfg: the settings.
    trainable: ``None`` (everything trains), or a pytree of bools matching the
      parameters (or a function params -> such a pytree), False where the
      parameter must not move.  Frozen parameters get exactly zero updates, no
      weight decay, no Adam state, and do not count in the clipping norm.

  Returns:
    An optax transformation whose ``update(grads, state, params)`` needs params
    (AdamW's decay uses them).
  """
  tx = optax.adamw(
    learning_rate=make_schedule(cfg),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    mu_dtype=None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype),
    weight_decay=cfg.weight_decay,
    mask=decay_mask,
  )
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  if trainable is not None:
    # partition (not masked) so frozen parameters carry no Adam moments and are
    # outside the clipping norm, like parameters absent from a torch optimizer.
    def labels(params):
      mask = trainable(params) if callable(trainable) else trainable
      return jax.tree.map(lambda t: "train" if t else "frozen", mask)

    tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
  """(B, ...) -> (num_micro, B // num_micro, ...), micro-batch i = rows i, i+m, ...

  Strided rather than contiguous: with the batch axis sharded in contiguous
  blocks, every device then holds its share of *every* micro-batch, so no
  micro-batch runs on a subset of the devices.
  """
  b = x.shape[0]
  if b % num_micro:
    raise ValueError(f"accumulate_gradients: batch size {b} is not divisible by num_micro={num_micro}")
  return jnp.swapaxes(x.reshape((b // num_micro, num_micro) + x.shape[1:]), 0, 1)


def accumulate_gradients(
  loss_fn: Callable[..., Any],
  params: PyTree,
  batch: PyTree,
  num_micro: int,
  *,
  rng: jax.Array | None = None,
  has_aux: bool = False,
):
  """Mean loss and gradient over ``num_micro`` equal micro-batches, via ``lax.scan``.

  Args:
    loss_fn: ``loss_fn(params, micro_batch)`` or, when ``rng`` is given,
      ``loss_fn(params, micro_batch, rng_i)`` with ``rng_i = fold_in(rng, i)``.
      Returns a scalar loss that is a *mean* over the micro-batch (then the mean
      over micro-batches equals the big batch's mean), or ``(loss, aux)`` when
      ``has_aux``.
    params: differentiated argument.
    batch: pytree of arrays with a common leading batch axis divisible by
      ``num_micro``.
    num_micro: number of micro-batches; 1 calls ``loss_fn`` once, no scan.
    rng: optional key, folded with the micro-batch index.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux leaves are averaged
      over micro-batches (so they should be means too).

  Returns:
    ``(loss, grads)`` or ``((loss, aux), grads)``.  Gradients are accumulated in
    float32 and returned in float32; the loss is float32.
  """
  if num_micro < 1:
    raise ValueError(f"accumulate_gradients: num_micro must be >= 1, got {num_micro}")

  def call(p, mb, i):
    out = loss_fn(p, mb) if rng is None else loss_fn(p, mb, jax.random.fold_in(rng, i))
    return out if has_aux else (out, None)

  grad_fn = jax.value_and_grad(call, has_aux=True)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)

  if num_micro == 1:
    (loss, aux), grads = grad_fn(params, batch, 0)
    loss, grads, aux = f32(loss), f32(grads), f32(aux)
    return ((loss, aux), grads) if has_aux else (loss, grads)

  micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
  aux_shape = jax.eval_shape(lambda: call(params, jax.tree.map(lambda x: x[0], micro), 0)[1])
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)

  def body(carry, xs):
    loss_acc, aux_acc, grad_acc = carry
    i, mb = xs
    (loss, aux), grads = grad_fn(params, mb, i)
    add = lambda a, b: a + jnp.asarray(b, jnp.float32)
    return (
      loss_acc + loss.astype(jnp.float32),
      jax.tree.map(add, aux_acc, aux),
      jax.tree.map(add, grad_acc, grads),
    ), None

  init = (jnp.zeros((), jnp.float32), zeros(aux_shape), zeros(jax.eval_shape(lambda: params)))
  (loss, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro))
  scale = 1.0 / num_micro
  loss, aux, grads = jax.tree.map(lambda x: x * scale, (loss, aux, grads))
  return ((loss, aux), grads) if has_aux else (loss, grads)
