"""Typed model configurations.

ml_collections ConfigDicts live at the edge (``experiments/``, ``launch/``);
library code receives these frozen dataclasses.  Field names follow the
reference's Hugging Face configs (``hidden_size``, ``intermediate_size``, ...)
so that a ``config.json`` converts field for field.

Every config validates itself on construction and raises :class:`ConfigError`
naming the offending field, before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash", "dot_product_attention")
DTYPES = ("float32", "bfloat16", "float16")
# CALM's generative heads by config name; each is implemented in calm_jax/models/heads/<name>.py and
# listed in calm_jax.models.heads.HEADS (which checks that the two lists agree).
HEAD_NAMES = ("energy", "diffusion", "flow")
FLOW_SOLVERS = ("midpoint", "euler")


class ConfigError(ValueError):
  """A configuration value is invalid.  The message names the field."""


def _check(cond: bool, field: str, msg: str, prefix: str):
  if not cond:
    name = f"{prefix}.{field}" if prefix else field
    raise ConfigError(f"{name}: {msg}")


def dtype_of(name: str):
  """Maps a dtype name used in configs to a jnp dtype."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


class _Base:
  """Shared helpers: validation with a field prefix, dict round trip."""

  def validate(self, prefix: str = "") -> None:  # pragma: no cover - overridden
    pass

  def __post_init__(self):
    self.validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], prefix: str = ""):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
      if k not in names:
        where = f"{prefix}.{k}" if prefix else k
        raise ConfigError(f"{where}: unknown field for {cls.__name__} "
                          f"(known: {', '.join(sorted(names))})")
      sub = _NESTED.get((cls.__name__, k))
      kwargs[k] = sub.from_dict(v, f"{prefix}.{k}" if prefix else k) if sub and isinstance(v, Mapping) else v
    try:
      obj = cls(**kwargs)
    except ConfigError as e:
      raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(_Base):
  """The chunk autoencoder (reference: ``AutoencoderConfig``)."""
  vocab_size: int = 128257
  hidden_size: int = 512
  intermediate_size: int = 1280
  latent_size: int = 128
  patch_size: int = 4
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  ae_dropout: float = 0.15
  kl_clamp: float = 0.5
  kl_weight: float = 1e-3
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  def validate(self, prefix: str = ""):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size"):
      _check(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}", prefix)
    for f in ("num_encoder_layers", "num_decoder_layers"):
      v = getattr(self, f)
      _check(v >= 2 and v % 2 == 0, f,
             f"must be an even number >= 2 (half the layers run per token, half per chunk), got {v}", prefix)
    _check(0.0 <= self.ae_dropout < 1.0, "ae_dropout", f"must lie in [0, 1), got {self.ae_dropout}", prefix)
    _check(self.kl_weight >= 0, "kl_weight", f"must be >= 0, got {self.kl_weight}", prefix)
    _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}", prefix)
    _check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}", prefix)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_Base):
  """A Llama-style decoder backbone (reference: HF ``LlamaModel``)."""
  vocab_size: int = 128257
  hidden_size: int = 768
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  # Mixed precision as the reference trains (torch autocast bf16), with dtype='bfloat16' and
  # param_dtype='float32': fp32 master weights (and gradients, optimizer state); every Dense / einsum
  # in bf16; RMSNorm / LayerNorm statistics, attention softmax, the energy score and all losses in
  # fp32 (tests/test_precision.py).  The paper-size experiments default to it.
  dtype: str = "float32"          # compute dtype
  param_dtype: str = "float32"    # storage dtype of the parameters
  scan_layers: bool = False       # one scanned layer stack (fast compiles) or a Python loop
  remat_policy: str = "none"      # none | full | dots | dots_no_batch
  # auto (by platform: cuDNN on GPUs in bf16, splash on TPUs, else query-chunked for T >= 256) |
  # xla (einsum) | chunked | cudnn | splash | dot_product_attention: calm_jax.models.attention
  attention_impl: str = "auto"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def validate(self, prefix: str = ""):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
      _check(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}", prefix)
    _check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
           f"{self.num_attention_heads} heads do not divide hidden_size={self.hidden_size}", prefix)
    _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
           f"{self.num_key_value_heads} KV heads do not divide num_attention_heads={self.num_attention_heads}",
           prefix)
    _check(self.head_dim % 2 == 0, "num_attention_heads",
           f"head_dim={self.head_dim} must be even for rotary embeddings", prefix)
    _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}", prefix)
    _check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}", prefix)
    _check(self.remat_policy in REMAT_POLICIES, "remat_policy",
           f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}", prefix)
    _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl",
           f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}", prefix)


def check_beta(beta: float, field: str = "beta", prefix: str = ""):
  """The energy score is strictly proper only for exponents in (0, 2)."""
  _check(0.0 < float(beta) < 2.0, field,
         f"must lie in the open interval (0, 2), got {beta}: the energy score is strictly proper only "
         "there (at 2 it is merely proper and training collapses to the mean; at 0 it is constant)", prefix)


@dataclasses.dataclass(frozen=True)
class EnergyConfig(_Base):
  """CALM: backbone + a generative head (reference: ``CALMConfig`` with ``model_type``).

  ``head`` picks the generative head (:data:`HEAD_NAMES`): 'energy' (the reference's
  ``EnergyTransformer``, the default), 'diffusion' (``DiffusionTransformer``) or 'flow'
  (``FlowTransformer``).  ``num_samples`` is N, the model samples (energy) or training
  replicates (diffusion, flow) per position.  Fields that only one head reads:
  energy: ``noise_size``, ``num_target_samples``, ``beta``; diffusion:
  ``diffusion_sampling_steps`` (respaced DDPM steps, the reference's "100"); flow:
  ``flow_sampling_steps`` (solver steps; the reference's code runs 10 midpoint steps =
  20 network calls, its paper's text says 100 steps) and ``flow_solver``.
  """
  backbone: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  patch_size: int = 4
  latent_size: int = 128
  noise_size: int = 64
  num_mlp_layers: int = 4
  num_samples: int = 8            # N model samples per position
  num_target_samples: int = 100   # M posterior samples of the target per position
  beta: float = 1.0               # exponent of the energy score ("alpha" in the paper)
  head: str = "energy"            # energy | diffusion | flow
  diffusion_sampling_steps: int = 100
  flow_sampling_steps: int = 10
  flow_solver: str = "midpoint"   # midpoint (2 network calls a step) | euler (1)

  def validate(self, prefix: str = ""):
    for f in ("patch_size", "latent_size", "noise_size", "num_mlp_layers", "num_target_samples"):
      _check(getattr(self, f) > 0, f, f"must be positive, got {getattr(self, f)}", prefix)
    _check(self.head in HEAD_NAMES, "head", f"must be one of {HEAD_NAMES}, got {self.head!r}", prefix)
    if self.head == "energy":
      _check(self.num_samples >= 2, "num_samples",
             f"the energy score needs at least 2 model samples per position, got {self.num_samples}", prefix)
    else:
      _check(self.num_samples >= 1, "num_samples", f"must be positive, got {self.num_samples}", prefix)
    _check(2 <= self.diffusion_sampling_steps <= 1000, "diffusion_sampling_steps",
           f"must lie in [2, 1000] (respaced steps of the 1000-step schedule; one step has no posterior "
           f"variance), got {self.diffusion_sampling_steps}", prefix)
    _check(self.flow_sampling_steps >= 1, "flow_sampling_steps",
           f"must be positive, got {self.flow_sampling_steps}", prefix)
    _check(self.flow_solver in FLOW_SOLVERS, "flow_solver",
           f"must be one of {FLOW_SOLVERS}, got {self.flow_solver!r}", prefix)
    check_beta(self.beta, "beta", prefix)
    self.backbone.validate(f"{prefix}.backbone" if prefix else "backbone")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(_Base):
  """The discrete baseline: the same backbone with an untied LM head (HF ``LlamaForCausalLM``)."""
  backbone: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)

  def validate(self, prefix: str = ""):
    self.backbone.validate(f"{prefix}.backbone" if prefix else "backbone")


_NESTED = {
    ("EnergyConfig", "backbone"): LlamaConfig,
    ("TransformerConfig", "backbone"): LlamaConfig,
}
