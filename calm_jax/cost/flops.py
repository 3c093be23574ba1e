"""Analytic parameter and FLOPs accounting for the autoencoder, CALM and the baseline.

Everything here is arithmetic on the typed configs: nothing is built or traced,
so a count for CALM-XL costs microseconds.  The counting convention (written
out in ``docs/FLOPS.md``) is the one that reproduces the paper's Table 1
(CALM_NOTES §6.3):

* A matmul of an (m x k) by a (k x n) matrix costs 2·m·k·n FLOPs.  Only
  matmuls count: norms, activations, softmax, RoPE, biases and the energy
  loss's distances are left out (each is < 0.1% of a model here).  An
  embedding lookup is a gather and costs nothing; a vocabulary projection
  (the baseline's LM head, the autoencoder's tied output matrix) costs 2·d·V.
* Attention costs 4·context·(heads·head_dim) per position and layer (QKᵀ and
  AV), at the *full* context, not the causal average.  ``context`` counts the
  positions the backbone attends over: tokens for the baseline, chunks
  ("steps") for CALM.
* Training costs 3x the forward pass (forward + backward with 2x).  Frozen
  parts that run forward only (the autoencoder encoder producing CALM's
  targets) count 1x.
* CALM's backbone, compression and head run once per chunk of K tokens, so
  their per-token cost is divided by K; the autoencoder decoder's vocabulary
  projection runs on every token.
* The head's N training samples each count forward and backward; what depends
  on the hidden state alone counts once per position (``head_convention``
  ``factored``, the default: model FLOPs, the least an exact implementation
  needs, and the best fit to Table 1).  ``shared_cond`` counts what
  ``calm_jax.models.heads.energy`` executes today, ``reference`` what the PyTorch code does.
* A head's inference cost is its per-call cost times its network calls per
  sample: 1 for the energy head, the respaced steps for diffusion (100), the
  solver's calls for flow (10 midpoint steps = 20).  Each head counts itself
  (``calm_jax.models.heads.<name>``: ``param_counts``, ``forward_flops``).

All per-token numbers are per *token*, whatever the model kind, so CALM and
the baseline compare directly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from calm_jax.configs import HEAD_NAMES, AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.models import heads

HEAD_CONVENTIONS = ("shared_cond", "reference", "factored")
KINDS = ("autoencoder", "energy", "transformer")


# --------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts of one model.

  ``total`` is every parameter of the model proper.  For CALM that excludes the
  frozen autoencoder, which is reported in ``frozen`` (the paper's #Params do
  not include it, CALM_NOTES §2.1).  ``embedding`` counts the V x d matrices
  (input embedding, untied LM head); ``parts`` maps a module name to its count
  and sums to ``total``.
  """
  total: int
  trainable: int
  embedding: int
  frozen: int = 0
  parts: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def non_embedding(self) -> int:
    return self.total - self.embedding


def _dense(n_in: int, n_out: int, bias: bool) -> int:
  return n_in * n_out + (n_out if bias else 0)


def llama_layer_params(cfg: LlamaConfig) -> int:
  """One decoder layer: GQA attention (no biases), SwiGLU MLP, two RMSNorms."""
  d, hd = cfg.hidden_size, cfg.head_dim
  q = o = d * cfg.num_attention_heads * hd
  kv = 2 * d * cfg.num_key_value_heads * hd
  return q + kv + o + 3 * d * cfg.intermediate_size + 2 * d


def llama_params(cfg: LlamaConfig) -> dict[str, int]:
  """The backbone (``LlamaModel``): embedding, layers, final RMSNorm."""
  return {"embed": cfg.vocab_size * cfg.hidden_size,
          "layers": cfg.num_hidden_layers * llama_layer_params(cfg),
          "final_norm": cfg.hidden_size}


def autoencoder_params(cfg: AutoencoderConfig) -> ParamCount:
  """The chunk autoencoder (CALM_NOTES §1.1); its output matrix is the tied embedding."""
  d, ff, k, l = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.latent_size
  ae_layer = d + 3 * d * ff                                  # RMSNorm + SwiGLU without bias
  parts = {
      "embed": cfg.vocab_size * d,
      "encoder_layers": cfg.num_encoder_layers * ae_layer,
      "squeeze": _dense(k * d, d, True),
      "encoder_norm": d,
      "hidden_to_latent": _dense(d, 2 * l, True),
      "latent_to_hidden": _dense(l, d, True),
      "decoder_layers": cfg.num_decoder_layers * ae_layer,
      "expand": _dense(d, k * d, True),
      "decoder_norm": d,
  }
  total = sum(parts.values())
  return ParamCount(total, total, parts["embed"], 0, parts)


def compression_params(cfg: EnergyConfig) -> int:
  """Linear(K·d → 2d) → SiLU → Linear(2d → d) → LayerNorm, all with biases."""
  d, k = cfg.backbone.hidden_size, cfg.patch_size
  return _dense(k * d, 2 * d, True) + _dense(2 * d, d, True) + 2 * d


def head_params(cfg: EnergyConfig) -> dict[str, int]:
  """The generative head's parameters by part (:meth:`calm_jax.models.heads.base.GenerativeHead.param_counts`;
  the energy head: every linear has a bias, every norm is an affine LayerNorm, CALM_NOTES §2.3)."""
  return heads.get(cfg).param_counts()


def energy_params(cfg: EnergyConfig, ae_cfg: AutoencoderConfig | None = None) -> ParamCount:
  """CALM with the energy head.  ``ae_cfg`` given: its parameters are reported as ``frozen``."""
  bb = llama_params(cfg.backbone)
  head = head_params(cfg)
  parts = {"embed": bb["embed"], "layers": bb["layers"], "final_norm": bb["final_norm"],
           "compression": compression_params(cfg), "head": sum(head.values())}
  total = sum(parts.values())
  frozen = autoencoder_params(ae_cfg).total if ae_cfg is not None else 0
  return ParamCount(total, total, parts["embed"], frozen, parts)


def transformer_params(cfg: TransformerConfig) -> ParamCount:
  """The baseline: backbone plus an untied, bias-free LM head."""
  bb = llama_params(cfg.backbone)
  parts = dict(bb, lm_head=cfg.backbone.hidden_size * cfg.backbone.vocab_size)
  total = sum(parts.values())
  return ParamCount(total, total, parts["embed"] + parts["lm_head"], 0, parts)


def count_params(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None) -> ParamCount:
  """Dispatch on ``kind`` (``autoencoder`` | ``energy`` | ``transformer``)."""
  if kind == "autoencoder":
    return autoencoder_params(cfg)
  if kind == "energy":
    return energy_params(cfg, ae_cfg)
  if kind == "transformer":
    return transformer_params(cfg)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --------------------------------------------------------------------------- FLOPs per token


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
  """FLOPs per token by part.  Parts a model does not have stay 0.

  backbone     the decoder layers' matmuls (q, k, v, o, MLP)
  attention    QKᵀ and AV over the context
  compression  CALM's input compression MLP
  head         CALM's generative head, with all its samples
  ae_encoder   the autoencoder encoder (CALM training: the targets; AE training)
  ae_decoder   the autoencoder decoder including its tied vocabulary projection
  lm_head      the baseline's vocabulary projection
  """
  backbone: float = 0.0
  attention: float = 0.0
  compression: float = 0.0
  head: float = 0.0
  ae_encoder: float = 0.0
  ae_decoder: float = 0.0
  lm_head: float = 0.0

  @property
  def total(self) -> float:
    return sum(self.as_dict().values())

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def _layer_matmul_params(cfg: LlamaConfig) -> int:
  # Same as llama_layer_params without the norms: the weights a token multiplies by.
  return llama_layer_params(cfg) - 2 * cfg.hidden_size


def attention_flops(cfg: LlamaConfig, context: int) -> float:
  """QKᵀ and AV at the full ``context`` for one position, all layers (forward)."""
  return 4.0 * cfg.num_hidden_layers * context * cfg.num_attention_heads * cfg.head_dim


def autoencoder_encoder_flops(cfg: AutoencoderConfig) -> float:
  """Forward FLOPs per token of the encoder: half its layers per token, half per chunk."""
  d, ff, k, l = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.latent_size
  half = cfg.num_encoder_layers // 2
  per_chunk = k * half * 3 * d * ff + k * d * d + half * 3 * d * ff + d * 2 * l
  return 2.0 * per_chunk / k


def autoencoder_decoder_flops(cfg: AutoencoderConfig) -> float:
  """Forward FLOPs per token of the decoder, including the tied d x V output projection."""
  d, ff, k, l = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.latent_size
  half = cfg.num_decoder_layers // 2
  per_chunk = l * d + half * 3 * d * ff + d * k * d + k * half * 3 * d * ff + k * d * cfg.vocab_size
  return 2.0 * per_chunk / k


def autoencoder_flops(cfg: AutoencoderConfig, *, train: bool = True) -> FlopsBreakdown:
  """Per token of the autoencoder's own training (3x) or of a full encode-decode (1x)."""
  m = 3.0 if train else 1.0
  return FlopsBreakdown(ae_encoder=m * autoencoder_encoder_flops(cfg),
                        ae_decoder=m * autoencoder_decoder_flops(cfg))


def head_flops_per_position(cfg: EnergyConfig, num_samples: int,
                            head_convention: str = "factored", train: bool = False) -> float:
  """Forward FLOPs of the generative head at one position for ``num_samples`` samples.

  The head's own count (:meth:`calm_jax.models.heads.base.GenerativeHead.forward_flops`):
  its per-call cost times its network calls per sample (1 for the energy head and in
  training; the sampler's steps for diffusion and flow at inference).  The
  conventions differ only in what runs once per position rather than once per
  sample (they agree at one sample); for the energy head:

  ``reference``    everything per sample: the PyTorch reference repeats the
                   hidden state N times before the head.
  ``shared_cond``  the hidden state's projection (d x d) once per position,
                   broadcast over the samples: what ``calm_jax.models.heads.energy.EnergyHead``
                   computes.
  ``factored``     every matmul that depends on the hidden state alone once per
                   position: the projection and, in each block, the conditioning
                   half of the first linear (its input is concat(LN(x), cond), so
                   W·[a; c] = W_a·a + W_c·c with W_c·c shared).  The least work
                   an exact implementation needs; it fits Table 1 best.
  """
  if head_convention not in HEAD_CONVENTIONS:
    raise ValueError(f"head_convention must be one of {HEAD_CONVENTIONS}, got {head_convention!r}")
  return heads.get(cfg).forward_flops(num_samples, train, head_convention)


def transformer_flops(cfg: TransformerConfig, context: int, *, train: bool) -> FlopsBreakdown:
  """Per-token FLOPs of the baseline; ``train`` multiplies everything by 3."""
  b = cfg.backbone
  m = 3.0 if train else 1.0
  return FlopsBreakdown(backbone=m * 2.0 * b.num_hidden_layers * _layer_matmul_params(b),
                        attention=m * attention_flops(b, context),
                        lm_head=m * 2.0 * b.hidden_size * b.vocab_size)


def energy_flops(cfg: EnergyConfig, ae_cfg: AutoencoderConfig, context: int, *, train: bool,
                 num_samples: int | None = None, head_convention: str = "factored") -> FlopsBreakdown:
  """Per-token FLOPs of CALM; ``context`` is in chunks (steps).

  Training: backbone, attention, compression and the head's ``num_samples``
  (default ``cfg.num_samples``) forward and backward (3x), plus one frozen
  forward of the AE encoder for the targets.  The AE decoder is not used.
  Inference: one forward with ``num_samples`` (default 1) head samples, each
  costing the head's network calls per sample (``heads.get(cfg).network_calls``),
  plus the AE decoder on every chunk — its vocabulary projection on every token.
  """
  if ae_cfg.patch_size != cfg.patch_size or ae_cfg.latent_size != cfg.latent_size:
    raise ValueError(f"autoencoder (K={ae_cfg.patch_size}, l={ae_cfg.latent_size}) does not match "
                     f"CALM (K={cfg.patch_size}, l={cfg.latent_size})")
  b, k = cfg.backbone, cfg.patch_size
  n = num_samples if num_samples is not None else (cfg.num_samples if train else 1)
  m = 3.0 if train else 1.0
  return FlopsBreakdown(
      backbone=m * 2.0 * b.num_hidden_layers * _layer_matmul_params(b) / k,
      attention=m * attention_flops(b, context) / k,
      # The two biases (3d) and the LayerNorm (2d) are not matmul weights.
      compression=m * 2.0 * (compression_params(cfg) - 2 * b.hidden_size - 3 * b.hidden_size) / k,
      head=m * head_flops_per_position(cfg, n, head_convention, train=train) / k,
      ae_encoder=autoencoder_encoder_flops(ae_cfg) if train else 0.0,
      ae_decoder=0.0 if train else autoencoder_decoder_flops(ae_cfg))


def flops_per_token(kind: str, cfg, context: int, *, train: bool, ae_cfg: AutoencoderConfig | None = None,
                    **kw) -> FlopsBreakdown:
  """Dispatch on ``kind``; ``ae_cfg`` defaults to :func:`default_autoencoder` for CALM."""
  if kind == "transformer":
    return transformer_flops(cfg, context, train=train)
  if kind == "energy":
    return energy_flops(cfg, ae_cfg or default_autoencoder(cfg), context, train=train, **kw)
  if kind == "autoencoder":
    return autoencoder_flops(cfg, train=train)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def default_autoencoder(cfg: EnergyConfig) -> AutoencoderConfig:
  """The paper's autoencoder for a CALM config: defaults with CALM's K, l and V."""
  return AutoencoderConfig(vocab_size=cfg.backbone.vocab_size, patch_size=cfg.patch_size,
                           latent_size=cfg.latent_size)


def training_flops(kind: str, cfg, tokens: float, context: int, *, ae_cfg: AutoencoderConfig | None = None,
                   ae_tokens: float = 0.0, **kw) -> float:
  """Total training FLOPs for ``tokens`` tokens; for CALM plus training the AE on ``ae_tokens``."""
  total = tokens * flops_per_token(kind, cfg, context, train=True, ae_cfg=ae_cfg, **kw).total
  if kind == "energy":
    total += ae_tokens * autoencoder_flops(ae_cfg or default_autoencoder(cfg), train=True).total
  return total


def train_flops_per_token(kind: str, cfg, ae_cfg: AutoencoderConfig | None = None,
                          context: int | None = None) -> float:
  """Model FLOPs per trained token, for ``perf/mfu`` (``mfu(tokens_per_sec, this, peak)``).

  ``context`` is the attention context of the training blocks in positions:
  ``block_length`` tokens for the baseline, ``block_length // K`` chunks for
  CALM; ignored for the autoencoder.  Convention ``factored`` (docs/FLOPS.md):
  model FLOPs, not what remat or a redundant implementation re-executes.
  """
  if kind != "autoencoder" and (context is None or context <= 0):
    raise ValueError(f"train_flops_per_token({kind!r}) needs the attention context (positions), got {context}")
  return flops_per_token(kind, cfg, context or 0, train=True, ae_cfg=ae_cfg).total


# --------------------------------------------------------------------------- comparisons


@dataclasses.dataclass(frozen=True)
class CostRow:
  """One model's row of a Table-1 style comparison."""
  name: str
  kind: str
  params: ParamCount
  train_flops: float                 # total, including the AE's training for CALM
  infer_flops_per_token: float
  train_breakdown: FlopsBreakdown    # per token
  infer_breakdown: FlopsBreakdown    # per token


ModelSpec = tuple  # (kind, config) or (kind, config, ae_config)


def compare(models: Mapping[str, ModelSpec], tokens: float, context: int, *, ae_tokens: float = 15e9,
            head_convention: str = "factored") -> list[CostRow]:
  """Cost rows for named model specs, in the order given.

  ``models`` maps a name to ``(kind, config)`` or ``(kind, config, ae_config)``;
  a CALM spec without an AE config gets :func:`default_autoencoder`.  ``tokens``
  is the training budget, ``context`` the attention context in positions
  (tokens for the baseline, chunks for CALM), ``ae_tokens`` the AE's training
  budget (charged to every CALM row).
  """
  rows = []
  for name, spec in models.items():
    kind, cfg = spec[0], spec[1]
    ae_cfg = spec[2] if len(spec) > 2 else None
    kw = {}
    if kind == "energy":
      ae_cfg = ae_cfg or default_autoencoder(cfg)
      kw = {"head_convention": head_convention}
    train = flops_per_token(kind, cfg, context, train=True, ae_cfg=ae_cfg, **kw)
    infer = flops_per_token(kind, cfg, context, train=False, ae_cfg=ae_cfg, **kw)
    rows.append(CostRow(name, kind, count_params(kind, cfg, ae_cfg),
                        training_flops(kind, cfg, tokens, context, ae_cfg=ae_cfg,
                                       ae_tokens=ae_tokens if kind == "energy" else 0.0, **kw),
                        infer.total, train, infer))
  return rows


def savings(row: CostRow, baseline: CostRow) -> tuple[float, float]:
  """Fraction of training and inference FLOPs ``row`` saves against ``baseline``."""
  return (1.0 - row.train_flops / baseline.train_flops,
          1.0 - row.infer_flops_per_token / baseline.infer_flops_per_token)


# --------------------------------------------------------------------------- the paper's models


PAPER_TOKENS = 5e11        # 250k steps x 2M tokens (CALM_NOTES §2.6)
PAPER_CONTEXT = 2048       # tokens for the baseline, steps for CALM (Table 1 caption)
PAPER_AE_TOKENS = 15e9     # the AE's 15B-token Pile subset (§1.3)
PAPER_VOCAB = 128257

# Table 1 of the paper: (#params, total training FLOPs, inference FLOPs per token).
# The paper truncates its parameter counts (281.96M is printed 281M).
PAPER_TABLE1 = {
    "transformer_s": (281e6, 6.6e20, 4.4e8),
    "transformer_m": (465e6, 11.9e20, 7.9e8),
    "transformer_l": (849e6, 22.5e20, 15.0e8),
    "calm_m": (371e6, 3.7e20, 2.9e8),
    "calm_l": (735e6, 7.7e20, 4.6e8),
    "calm_xl": (1.82e9, 19.5e20, 9.4e8),
}


def _backbone(layers: int, d: int, ff: int, heads: int = 16) -> LlamaConfig:
  # Heads are 16 for every size: stated for S and M, assumed for L and XL (CALM_NOTES §2.1).
  return LlamaConfig(vocab_size=PAPER_VOCAB, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads)


def _calm(bb: LlamaConfig, k: int = 4) -> tuple[str, EnergyConfig, AutoencoderConfig]:
  # Head blocks = layers / 4; latent size l = 32·K (CALM_NOTES §1.2, §2.1).
  cfg = EnergyConfig(backbone=bb, patch_size=k, latent_size=32 * k, num_mlp_layers=bb.num_hidden_layers // 4)
  return ("energy", cfg, default_autoencoder(cfg))


def paper_configs() -> dict[str, tuple[Any, ...]]:
  """The paper's models by name: ``(kind, config)`` or ``(kind, config, ae_config)``.

  transformer_s/m/l and calm_m/l/xl (Table 1, K = 4), and the K ablation of
  CALM-L (Fig. 4) as calm_l_k1/k2/k4/k8 (calm_l_k4 is calm_l).
  """
  s, m = _backbone(12, 768, 2048), _backbone(16, 1024, 2752)
  l, xl = _backbone(16, 1536, 4096), _backbone(16, 2560, 6880)
  out = {"transformer_s": ("transformer", TransformerConfig(backbone=s)),
         "transformer_m": ("transformer", TransformerConfig(backbone=m)),
         "transformer_l": ("transformer", TransformerConfig(backbone=l)),
         "calm_m": _calm(m), "calm_l": _calm(l), "calm_xl": _calm(xl)}
  for k in (1, 2, 4, 8):
    out[f"calm_l_k{k}"] = _calm(l, k)
  return out


def head_configs() -> dict[str, tuple[Any, ...]]:
  """CALM with each generative head, by name ``<base>_<head>``: ``ablation`` is the paper's
  head-ablation base (§7.4: d 768, 12 layers, 16 heads, FFN 2048, 3 head blocks, K = 4) and
  ``m`` CALM-M as the reference's train_{energy,diffusion,flow}.sh build it (4 head blocks)."""
  out = {}
  bases = (("ablation", _backbone(12, 768, 2048), 3), ("m", _backbone(16, 1024, 2752), 4))
  for base_name, bb, blocks in bases:
    for head in HEAD_NAMES:
      kind, cfg, ae = _calm(bb)
      cfg = cfg.replace(num_mlp_layers=blocks, head=head)
      out[f"{base_name}_{head}"] = (kind, cfg, ae)
  return out


@dataclasses.dataclass(frozen=True)
class PaperCell:
  """One number of Table 1 next to ours; ``residual`` = ours / paper − 1."""
  model: str
  column: str      # params | train_flops | infer_flops
  ours: float
  paper: float

  @property
  def residual(self) -> float:
    return self.ours / self.paper - 1.0


def paper_table1(head_convention: str = "factored") -> tuple[list[CostRow], list[PaperCell]]:
  """Recomputes Table 1: our rows for its six models and every cell against the paper."""
  specs = paper_configs()
  rows = compare({n: specs[n] for n in PAPER_TABLE1}, PAPER_TOKENS, PAPER_CONTEXT,
                 ae_tokens=PAPER_AE_TOKENS, head_convention=head_convention)
  cells = []
  for r in rows:
    p, tr, inf = PAPER_TABLE1[r.name]
    cells += [PaperCell(r.name, "params", r.params.total, p),
              PaperCell(r.name, "train_flops", r.train_flops, tr),
              PaperCell(r.name, "infer_flops", r.infer_flops_per_token, inf)]
  return rows, cells


def params_match_paper(ours: float, paper: float, tol: float = 0.005) -> bool:
  """Whether our count is within ``tol`` of the range the paper's truncated figure stands for.

  The paper truncates to three significant figures, so "281M" means
  [281M, 282M); we accept counts within ``tol`` (relative) of that range.
  """
  step = 10.0 ** (len(str(int(paper))) - 3)   # the unit of the third significant figure
  lo, hi = paper, paper + step
  gap = max(lo - ours, ours - hi, 0.0)
  return gap <= tol * paper


# --------------------------------------------------------------------------- measured peak and MFU


def measure_matmul_peak(dtype: Any = "bfloat16", n: int = 8192, iters: int = 10) -> float:
  """FLOP/s of a jitted n x n x n matmul on the default backend (best of ``iters`` timed runs).

  A practical ceiling for MFU where the vendor peak is unknown or unreachable
  (CPUs, MIG slices).  Uses 2·n³ FLOPs per matmul; the first call compiles
  and is not timed.  Use ``n`` ≥ 4096 on accelerators so the matmul is
  compute-bound; small ``n`` on a CPU only for tests.
  """
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(dtype)
  # Operands are jit arguments (nothing constant-folds); their values do not change the time,
  # and filling them costs nothing next to drawing n^2 random numbers.
  a = jnp.full((n, n), 0.5, dt)
  b = jnp.full((n, n), 0.25, dt)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


# Dense bf16 peak FLOP/s per JAX device, by a substring of ``device.device_kind`` (first match wins).
# Vendor numbers (TPU: per chip; v2/v3 expose each of a chip's two cores as a device).
KNOWN_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12), ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 61.5e12), ("TPU v2", 22.5e12),
    ("B200", 2250e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
)


def device_peak_flops(device: Any, dtype: Any = "bfloat16") -> tuple[float, str]:
  """Peak FLOP/s of one device for matmuls in ``dtype``, and where the number comes from.

  bf16 on a known TPU/GPU: the vendor peak (``KNOWN_BF16_PEAKS``).  Anything
  else (CPUs, fp32, unknown accelerators): measured now with
  :func:`measure_matmul_peak` -- small on a CPU (a fraction of a second), 4096²
  on an accelerator.
  """
  import jax.numpy as jnp

  kind = str(getattr(device, "device_kind", ""))
  name = jnp.dtype(dtype).name
  if name == "bfloat16" and device.platform != "cpu":
    for key, peak in KNOWN_BF16_PEAKS:
      if key.lower() in kind.lower():
        return peak, f"{kind} bf16 peak"
  cpu = device.platform == "cpu"
  peak = measure_matmul_peak(name, n=1024 if cpu else 4096, iters=3 if cpu else 10)
  return peak, f"measured {name} matmul on {kind or device.platform}"


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over ``peak`` FLOP/s (all in the same device scope).

  ``flops_per_token`` is the *training* count (e.g. ``flops_per_token(...,
  train=True).total``); ``peak`` is per device times the devices that produced
  ``tokens_per_sec``.
  """
  if peak <= 0:
    raise ValueError(f"peak must be positive, got {peak}")
  return tokens_per_sec * flops_per_token / peak
