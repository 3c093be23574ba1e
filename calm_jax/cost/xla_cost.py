"""Cross-checks the analytic FLOPs of :mod:`calm_jax.cost.flops` against XLA's cost analysis.

Three counts of the same compiled step:

  ``xla``       ``compiled.cost_analysis()['flops']``: every op XLA executes,
                matmuls at 2 FLOPs per multiply-add, elementwise ops and
                reductions at 1 FLOP per element (transcendentals apart).
  ``matmul``    the dot_generals of the step's jaxpr (walked before XLA), at
                2·M·N·K each: the traced matmul count, to separate the matmuls
                from the elementwise rest.
  ``analytic``  :func:`expected_train_flops` / :func:`expected_decode_flops`:
                the per-token counts of :mod:`calm_jax.cost.flops` turned into the
                program actually compiled (see below) plus a coarse model of
                the elementwise work.

What the analytic count is adjusted for (docs/FLOPS.md, "XLA cross-check"):
  * positions: the baseline scores every one of its T tokens; CALM reads S-1
    chunks (the last chunk is only a target) and encodes S-1 target chunks;
  * attention at the *compiled* context: the full T x T (or S-1 squared) score
    matrix in training, the whole cache capacity when decoding, as the
    masked einsum attention computes it;
  * the head as ``calm_jax.models.calm`` executes it (``EXECUTED_HEAD_CONVENTION``),
    without the noise embedding's input gradient (the noise
    is not differentiated);
  * the energy loss's N x M Gram matmul (forward and input gradient);
  * elementwise work: per-activation-element constants for norms, SwiGLU,
    softmax, residuals and the loss, and a per-parameter constant for the
    clipped AdamW update (:data:`ELEMENTWISE`).

Also the minimal steps compiled here (:func:`make_train_step`,
:func:`make_decode_step`), used by ``benchmarks/train_step.py``.

Dimension legend: B batch, T tokens, K chunk, S = T/K chunks, C cache capacity,
N head samples, M target samples, L latent, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, EnergyConfig
from calm_jax.cost import flops
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.backbone import init_cache
from calm_jax.models import heads
from calm_jax.models.calm import EnergyModel
from calm_jax.models.transformer import TransformerLM
from calm_jax.training import optim

# How calm_jax.models.calm.EnergyHead runs its N samples (flops.head_flops_per_position):
# linear_0 is split (ConcatDense), so the conditioning half runs once per position.
EXECUTED_HEAD_CONVENTION = "factored"

# Acceptance of the cross-check on tiny configs (issue 6): |xla / analytic - 1|.
TOLERANCE = 0.10
# The backend-optimised executable on CPU: fusion re-computes elementwise producers
# (CALM's train step measured +10.9% over the analytic count, +11.7% over the lowered one).
COMPILED_TOLERANCE = 0.15

# Elementwise FLOPs per element, as XLA counts them (1 per add/mul/compare/
# select/divide per element; exp, rsqrt, log and friends are transcendentals and
# do not count).  Forward and backward together for training; "fwd" for decode.
# They are rounded op counts read off the models' code, not fitted.
ELEMENTWISE = {
    # per element of the D-wide stream, per RMSNorm: square, mean, scale, weight; backward twice.
    "norm": 15.0, "norm_fwd": 5.0,
    # per element, per LayerNorm: mean, centre, square, mean, scale, weight, bias; backward twice.
    "layernorm": 22.0, "layernorm_fwd": 8.0,
    # per element of a SwiGLU / SiLU hidden: silu (mul, add, div) and the gate product.
    "glu": 12.0, "glu_fwd": 4.0,
    # per output element of a linear with a bias: the add, and its reduction in the backward.
    "bias": 2.0, "bias_fwd": 1.0,
    # per attention score: scale, mask select, max, subtract, sum, divide; backward twice.
    "score": 15.0, "score_fwd": 6.0,
    # per parameter: global-norm clipping and AdamW (moments, bias correction,
    # decay, learning rate, apply), with the zeros/ones of the gradient init.
    "adamw": 24.0,
    # energy loss, per (sample, sample) pair: pow-norm, mean and backward (+ 7 per latent
    # dim for the N x N exact differences); per (sample, target) pair of the Gram form.
    "pair_xx": 8.0, "pair_xx_dim": 7.0, "pair_xy": 18.0,
    # per logit: log-softmax (max, subtract, sum) and its backward.
    "logit": 8.0, "logit_fwd": 3.0,
}


# --------------------------------------------------------------------------- the compiled steps


def make_train_step(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None,
                    optim_cfg: optim.OptimConfig | None = None) -> tuple[Callable, optax.GradientTransformation]:
  """A minimal pure train step: value_and_grad of the model's loss + the reference's AdamW.

  Returns ``(step, tx)`` with ``step(params, opt_state, ae_params, tokens_BxT, key)
  -> (params, opt_state, loss)``; ``ae_params`` is the frozen autoencoder for
  ``kind='energy'`` and ignored (pass ``None``) otherwise.
  """
  tx = optim.make_optimizer(optim_cfg or optim.OptimConfig())

  def loss_fn(params, ae_params, tokens_BxT, key):
    if kind == "autoencoder":
      return models.autoencoder_loss_fn(cfg, params, tokens_BxT, key, train=True)
    if kind == "energy":
      return models.energy_loss_fn(cfg, ae_cfg, params, ae_params, tokens_BxT, key)
    if kind == "transformer":
      return models.transformer_loss_fn(cfg, params, tokens_BxT, key)
    raise ValueError(f"kind must be one of {flops.KINDS}, got {kind!r}")

  def step(params, opt_state, ae_params, tokens_BxT, key):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ae_params, tokens_BxT, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, tx


def make_decode_step(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None) -> Callable:
  """One generation step with a KV cache.

  CALM (``energy``): ``step(params, ae_params, cache, chunk_BxK, key) -> (logits_Bx1xKxV, cache)``:
  the backbone on one chunk, one head sample, the autoencoder's decode.
  Baseline (``transformer``): ``step(params, None, cache, token_Bx1, key) -> (logits_Bx1xV, cache)``.
  """
  if kind == "energy":
    def step(params, ae_params, cache, chunk_BxK, key):
      model, head = EnergyModel(cfg), heads.get(cfg)
      h_Bx1xD, cache = model.apply({"params": params}, chunk_BxK, cache=cache, method="hidden")
      noise = head.noise(key, h_Bx1xD.shape[:-1])
      z_Bx1xL = head.sample(params["generative_head"], h_Bx1xD, noise)
      logits = Autoencoder(ae_cfg).apply({"params": ae_params}, z_Bx1xL, method="decode")
      return logits, cache
    return step
  if kind == "transformer":
    def step(params, ae_params, cache, token_Bx1, key):
      del ae_params, key
      return TransformerLM(cfg).apply({"params": params}, token_Bx1, cache=cache)
    return step
  raise ValueError(f"decode steps exist for 'energy' and 'transformer', got {kind!r}")


# --------------------------------------------------------------------------- measured counts


def _flops_of(cost) -> float:
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def xla_flops(fn: Callable, *args, compiled: bool = True) -> float:
  """XLA's ``cost_analysis()['flops']`` of ``jax.jit(fn)`` for ``args`` (arrays or ShapeDtypeStructs).

  ``compiled=True``: of the backend-optimised executable (what runs);
  ``False``: of the lowered module before backend passes (same cost model,
  no fusion; far quicker to get).
  """
  lowered = jax.jit(fn).lower(*args)
  return _flops_of(lowered.compile().cost_analysis() if compiled else lowered.cost_analysis())


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else (v,)):
      if hasattr(x, "eqns"):
        yield x
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr


def jaxpr_matmul_flops(jaxpr) -> float:
  """2·M·N·K over the dot_generals of a jaxpr: scans times their length, shard_map bodies times
  their manual shards (global FLOPs), a cond's dearest branch, a while loop once."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
      total += 2.0 * k * math.prod(eqn.outvars[0].aval.shape)
      continue
    subs = list(_sub_jaxprs(eqn))
    if eqn.primitive.name == "cond":   # one branch runs: count the dearest
      total += max((jaxpr_matmul_flops(j) for j in subs), default=0.0)
      continue
    times = eqn.params.get("length", 1)
    if eqn.primitive.name == "shard_map":
      mesh = eqn.params["mesh"]
      manual = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", ()))
      times *= math.prod(mesh.shape[a] for a in manual)
    total += times * sum(jaxpr_matmul_flops(j) for j in subs)
  return total


def matmul_flops(fn: Callable, *args) -> float:
  """2·M·N·K summed over every dot_general traced by ``fn(*args)`` (nested jaxprs included)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# --------------------------------------------------------------------------- analytic counts of the compiled program


@dataclasses.dataclass(frozen=True)
class Expected:
  """Analytic FLOPs of one compiled step: ``matmul`` (by part) + ``elementwise``."""
  matmul_parts: dict[str, float]
  elementwise: float

  @property
  def matmul(self) -> float:
    return sum(self.matmul_parts.values())

  @property
  def total(self) -> float:
    return self.matmul + self.elementwise


def _llama_elementwise(b, positions: float, context: float, train: bool) -> float:
  """Norms, SwiGLU, residuals, rotary and softmax of a backbone over ``positions`` queries."""
  e = ELEMENTWISE
  sfx = "" if train else "_fwd"
  d, f, n = b.hidden_size, b.intermediate_size, b.num_hidden_layers
  per_layer = (2 * d * e["norm" + sfx] + f * e["glu" + sfx]
               + context * b.num_attention_heads * e["score" + sfx]
               + (3 if train else 1) * 2 * d                       # two residual adds
               + (3 if train else 1) * 3 * (b.num_attention_heads + b.num_key_value_heads) * b.head_dim)
  return positions * (n * per_layer + d * e["norm" + sfx])


def _head_elementwise(cfg: EnergyConfig, positions: float, samples: int, train: bool) -> float:
  e = ELEMENTWISE
  sfx = "" if train else "_fwd"
  d, ln, bias = cfg.backbone.hidden_size, e["layernorm" + sfx], e["bias" + sfx]
  # per sample: noise_embd + LN; per block in_ln, linear_0/1 with SiLU, linear_2 (2D) as SwiGLU,
  # down_proj, residual (5D of biases); the final LN, linear + SiLU, latent linear.
  block = d * (ln + 3 * e["glu" + sfx] + 5 * bias + (3 if train else 1))
  per_sample = d * (bias + ln) + cfg.num_mlp_layers * block + d * (ln + e["glu" + sfx] + bias)
  per_sample += cfg.latent_size * bias + (d if train else 0)   # + the broadcast hidden's gradient sum
  return positions * (samples * per_sample + d * (ln + bias))


def _ae_elementwise(ae: AutoencoderConfig, tokens: float, train: bool, encoder: bool, decoder: bool) -> float:
  e = ELEMENTWISE
  sfx = "" if train else "_fwd"
  d, f, k = ae.hidden_size, ae.intermediate_size, ae.patch_size
  layer = d * e["norm" + sfx] + f * e["glu" + sfx] + (3 if train else 1) * d
  half = ae.num_encoder_layers // 2
  # half the layers per token, half per chunk; squeeze/expand (D, K·D), the latent linears (2L, D) have biases.
  per_chunk = (k + 1) * half * layer + d * e["norm" + sfx] + (k + 1) * d * e["bias" + sfx]
  total = 0.0
  if encoder:
    total += tokens / k * (per_chunk + 2 * ae.latent_size * e["bias" + sfx])
  if decoder:
    total += tokens / k * (per_chunk + d * e["bias" + sfx]) + tokens * ae.vocab_size * e["logit" + sfx]
  return total


def _energy_head_only(kind: str, cfg):
  # The elementwise op counts above are read off the energy head's code; the matmul counts of
  # every head are in calm_jax.cost.flops.
  if kind == "energy" and cfg.head != "energy":
    raise ValueError(f"xla_cost: the analytic cross-check models the energy head only, got model.head="
                     f"{cfg.head!r} (its matmul FLOPs: calm_jax.cost.flops.flops_per_token)")


def expected_train_flops(kind: str, cfg, ae_cfg: AutoencoderConfig | None, batch: int, seq: int) -> Expected:
  """Analytic FLOPs of :func:`make_train_step` on a ``batch x seq`` token batch."""
  _energy_head_only(kind, cfg)
  b_t = float(batch * seq)
  e = ELEMENTWISE
  if kind == "transformer":
    bb = cfg.backbone
    fl = flops.transformer_flops(cfg, seq, train=True)
    # The loss projects only the seq - 1 positions that predict a token (models.transformer_loss_fn).
    b_p = float(batch * (seq - 1))
    parts = {"backbone": b_t * fl.backbone, "attention": b_t * fl.attention, "lm_head": b_p * fl.lm_head}
    ew = _llama_elementwise(bb, b_t, seq, True) + b_p * bb.vocab_size * e["logit"]
    n_params = flops.transformer_params(cfg).total
  elif kind == "autoencoder":
    fl = flops.autoencoder_flops(cfg, train=True)
    parts = {"ae_encoder": b_t * fl.ae_encoder, "ae_decoder": b_t * fl.ae_decoder}
    ew = _ae_elementwise(cfg, b_t, True, True, True)
    n_params = flops.autoencoder_params(cfg).total
  elif kind == "energy":
    k, s = cfg.patch_size, seq // cfg.patch_size
    pos = float(batch * (s - 1))                       # chunks read = positions predicted = targets
    fl = flops.energy_flops(cfg, ae_cfg, s - 1, train=True, head_convention=EXECUTED_HEAD_CONVENTION)
    d, n = cfg.backbone.hidden_size, cfg.num_samples
    parts = {"backbone": pos * k * fl.backbone, "attention": pos * k * fl.attention,
             "compression": pos * k * fl.compression,
             # noise_embd's input gradient is never formed: 2 of its 3 passes run.
             "head": pos * k * fl.head - pos * n * 2.0 * cfg.noise_size * d,
             "ae_encoder": pos * k * fl.ae_encoder,
             # the Gram matrix x·yᵀ (N x M per position) and its gradient in x, and the
             # N x N self-distance term's gradient W·x (losses.self_distance_pow's VJP).
             "energy_distance": 2 * 2.0 * pos * n * cfg.num_target_samples * cfg.latent_size
                                + 2.0 * pos * n * n * cfg.latent_size}
    ew = (_llama_elementwise(cfg.backbone, pos, s - 1, True) + _head_elementwise(cfg, pos, n, True)
          + pos * (2 * d * (e["glu"] + e["bias"]) + d * (e["layernorm"] + e["bias"]))   # compression
          + _ae_elementwise(ae_cfg, pos * k, False, True, False)
          + pos * (n * n * (e["pair_xx"] + e["pair_xx_dim"] * cfg.latent_size)
                   + n * cfg.num_target_samples * e["pair_xy"]
                   + 2 * cfg.latent_size * (n + cfg.num_target_samples)))
    n_params = flops.energy_params(cfg).total
  else:
    raise ValueError(f"kind must be one of {flops.KINDS}, got {kind!r}")
  return Expected(parts, ew + n_params * e["adamw"])


def expected_decode_flops(kind: str, cfg, ae_cfg: AutoencoderConfig | None, batch: int,
                          capacity: int) -> Expected:
  """Analytic FLOPs of one :func:`make_decode_step` call (attention over the whole cache)."""
  _energy_head_only(kind, cfg)
  e = ELEMENTWISE
  if kind == "transformer":
    fl = flops.transformer_flops(cfg, capacity, train=False)
    parts = {"backbone": batch * fl.backbone, "attention": batch * fl.attention, "lm_head": batch * fl.lm_head}
    return Expected(parts, _llama_elementwise(cfg.backbone, batch, capacity, False))
  if kind == "energy":
    k = cfg.patch_size
    fl = flops.energy_flops(cfg, ae_cfg, capacity, train=False, num_samples=1)
    parts = {name: batch * k * v for name, v in fl.as_dict().items() if v}
    ew = (_llama_elementwise(cfg.backbone, batch, capacity, False) + _head_elementwise(cfg, batch, 1, False)
          + batch * cfg.backbone.hidden_size * (2 * e["glu_fwd"] + 2 * e["bias_fwd"] + e["layernorm_fwd"]
                                                + e["bias_fwd"])
          + _ae_elementwise(ae_cfg, batch * k, False, False, True) - batch * k * ae_cfg.vocab_size * e["logit_fwd"])
    return Expected(parts, ew)
  raise ValueError(f"decode steps exist for 'energy' and 'transformer', got {kind!r}")


# --------------------------------------------------------------------------- the cross-check


@dataclasses.dataclass(frozen=True)
class CrossCheck:
  """One step's counts; ``residual`` = xla / analytic − 1 (``xla`` as ``stage`` says)."""
  name: str
  stage: str               # 'compiled' | 'lowered'
  xla: float
  matmul: float            # traced dot_generals
  expected: Expected

  @property
  def residual(self) -> float:
    return self.xla / self.expected.total - 1.0

  @property
  def matmul_residual(self) -> float:
    return self.matmul / self.expected.matmul - 1.0


def _count(name: str, fn: Callable, args, expected: Expected, compiled: bool) -> CrossCheck:
  traced = jax.jit(fn).trace(*args)          # traced once: the jaxpr and the HLO come from it
  lowered = traced.lower()
  cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  return CrossCheck(name, "compiled" if compiled else "lowered", _flops_of(cost),
                    jaxpr_matmul_flops(traced.jaxpr.jaxpr), expected)


def check_train(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None, *, batch: int = 2,
                seq: int = 32, compiled: bool = True) -> CrossCheck:
  """Counts :func:`make_train_step` on abstract inputs (nothing is allocated or run)."""
  step, tx = make_train_step(kind, cfg, ae_cfg)
  params = models.abstract_params(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  ae_params = models.abstract_params(ae_cfg) if kind == "energy" else None
  args = (params, opt_state, ae_params, jax.ShapeDtypeStruct((batch, seq), jnp.int32),
          jax.eval_shape(lambda: jax.random.key(0)))
  return _count(f"{kind}/train", step, args, expected_train_flops(kind, cfg, ae_cfg, batch, seq), compiled)


def check_decode(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None, *, batch: int = 2,
                 capacity: int = 16, compiled: bool = True) -> CrossCheck:
  """Counts one :func:`make_decode_step` into a cache of ``capacity`` positions."""
  step = make_decode_step(kind, cfg, ae_cfg)
  params = models.abstract_params(cfg)
  ae_params = models.abstract_params(ae_cfg) if kind == "energy" else None
  cache = jax.eval_shape(lambda: init_cache(cfg.backbone, batch, capacity))
  width = cfg.patch_size if kind == "energy" else 1
  args = (params, ae_params, cache, jax.ShapeDtypeStruct((batch, width), jnp.int32),
          jax.eval_shape(lambda: jax.random.key(0)))
  return _count(f"{kind}/decode", step, args, expected_decode_flops(kind, cfg, ae_cfg, batch, capacity),
                compiled)


def format_checks(checks: list[CrossCheck]) -> str:
  out = [f"{'step':<20}{'stage':>9}{'xla':>12}{'analytic':>12}{'resid':>8}{'matmul(jaxpr)':>15}{'analytic mm':>13}"
         f"{'resid':>8}"]
  for c in checks:
    out.append(f"{c.name:<20}{c.stage:>9}{c.xla:>12.4g}{c.expected.total:>12.4g}{c.residual:>+8.1%}{c.matmul:>15.4g}"
               f"{c.expected.matmul:>13.4g}{c.matmul_residual:>+8.1%}")
  return "\n".join(out)

