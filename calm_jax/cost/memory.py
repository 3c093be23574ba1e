"""Memory plan: per-device bytes of a training run on a target, from abstract shapes.

For a model (``kind``, config, autoencoder config) and a :class:`Target`
(devices, bytes per device, mesh) and :class:`Workload` (global batch, sequence
length, remat policy, gradient accumulation, dtypes), :func:`plan` adds up per
device:

  params       every parameter's shard under the rules table
               (:func:`calm_jax.parallel.sharding.logical_to_spec`), in ``param_dtype``;
  frozen AE    CALM's frozen autoencoder, sharded by the same rules (no grads,
               no optimiser state);
  optimizer    Adam's mu and nu, fp32 (8 bytes per parameter), sharded like
               the parameters; clipping and the step count are scalars;
  gradients    fp32, sharded like the parameters (reduce-scattered under FSDP);
               with gradient accumulation a second fp32 copy (the scan's
               accumulator next to the micro-batch's gradients);
  gathered     FSDP all-gathers one layer's weights at a time, in the compute
               dtype; counted twice (the next layer is prefetched), plus the
               largest non-layer matrix (embedding / LM head) gathered whole;
  activations  what the backward pass keeps, per layer per position, by remat
               policy (formula below), times the layers and the positions one
               device holds in one micro-batch, plus the model's non-layer
               activations (logits, the energy head's samples) and, under remat,
               one layer's full activations being recomputed;
  backward     the gradients in flight during the backward pass: one layer's
               full activations plus (not on TPU, whose compiler reuses their
               buffers) the non-layer activations, once more;
  AE encode    (CALM) the frozen encoder's forward over every target token,
               ``b*(2D + 3F/t)`` per token: transient, but counted (XLA may
               schedule it while the saved activations are live).

Activation formula (bytes per position per backbone layer; b = compute dtype
bytes, D width, Dkv = kv_heads * head_dim, F FFN width, H heads, C context
positions, t = tensor-parallel size; D-wide tensors are not split over
``tensor`` because there is no sequence parallelism)::

  none           b*(6D + (3D + 3Dkv + 4F)/t) + (H/t)*C*(4 + b)
                 [norm in/out x2, residuals, q k v and their rotations,
                  attention out, o/down outputs, gate, up, silu, product;
                  fp32 scores + compute-dtype probabilities]
  dots           b*(3D + (2D + 2Dkv + 2F)/t) + (H/t)*C*b
                 [every matmul output, the attention ones included]
  dots_no_batch  b*(3D + (D + 2Dkv + 2F)/t)
                 [weight matmul outputs only; attention recomputed]
  full           b*D   [the layer input only]

With cuDNN flash attention on GPU (``attention_impl='cudnn'``, ``'auto'`` in bf16/fp16, or
``'dot_product_attention'``) the C-proportional terms become ``(H/t)*4`` (the log-sum-exp).  With
splash attention on TPU (``'splash'``, or ``'auto'`` with C a multiple of 128) they are scaled by
``SPLASH_CONTEXT_FACTOR`` (fitted to XLA:TPU compiles).

Non-layer activations per position: the transformer's logits ``V/t*(b + 8)``
(compute-dtype logits, fp32 log-softmax and its gradient); CALM's input
compression ``b*(K*D + 5D)``, its head ``N*(b*(D*(6 + 12*blocks) + L) + 8*D*(blocks + 2))``
for the N samples (the last term: the fp32 LayerNorms), the energy score's fp32 pair matrices ``12*(N*N + N*M)`` and the M
posterior samples ``4*M*L``; the autoencoder's ``(layers/2)*(1 + 1/K)`` MLP
layers of ``b*(3D + 4F/t)`` per token and its logits ``V/t*(2b + 8)`` per token (the
tied projection's backward keeps a compute-dtype copy of their gradient).  Above
V = 32,768 both losses run in vocabulary blocks (``losses.blocked_token_nll``): the
logits terms become one block's fp32 logits, exponentials and cotangent, ``12*c`` per
token for a block of ``c`` columns (``losses.vocab_block_size`` of the global row count).

For TPU slices the plan is checked against the real step compiled for the
slice with libtpu (:mod:`calm_jax.parallel.aot`, ``launch.memory_plan
--topology``; the recorded compiles of the paper's experiments are in
``benchmarks/RESULTS_aot_tpu.json`` and tested by
``tests/test_sharding_cost.py::test_plan_agrees_with_recorded_tpu_compiles``).

Everything is an estimate of what XLA keeps live at the peak; a compiled
step's ``memory_analysis()`` (:func:`compiled_memory`, possible for small
models or on the target itself) is the ground truth.  Checked against it on
8 CPU devices (docs/SHARDING.md): 9% (transformer) and 13% (CALM) below the
compiled peak of the tiny configs; the autoencoder's estimate is ~45% low
(its dropout masks and random bits are not modelled).  The verdict uses
``usable_fraction`` of the device memory (default 0.9: the runtime, XLA's
scratch space and fragmentation take the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.parallel import sharding

GB = 1e9
GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the run goes.  ``mesh`` is ``(data, fsdp, tensor)``; one entry may be -1."""
  name: str
  num_devices: int
  bytes_per_device: float
  mesh: tuple[int, int, int] = (1, -1, 1)
  usable_fraction: float = 0.9
  platform: str = "gpu"

  def resolved_mesh(self) -> tuple[int, int, int]:
    return sharding.mesh_shape(*self.mesh, num_devices=self.num_devices)


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one optimizer step processes.  ``None`` fields take the model config's value."""
  global_batch: int
  seq_len: int                       # tokens per sequence
  grad_accum: int = 1
  remat_policy: str | None = None
  compute_dtype: str | None = None
  param_dtype: str | None = None


TARGETS = {
    # 8 x A100/H100 80 GB in one node: FSDP over all eight.
    "gpu8x80": Target("8 GPUs x 80 GB, FSDP (1,8,1)", 8, 80 * GB, (1, 8, 1), platform="gpu"),
    # TPU v5p-32: the suffix counts TensorCores; 2 per chip, so 16 chips (JAX devices), 95 GB HBM each.
    "v5p-32": Target("TPU v5p-32 = 16 chips x 95 GB, FSDP (1,16,1)", 16, 95 * GB, (1, 16, 1), platform="tpu"),
}


class _MeshShape:
  """Just enough of a Mesh for :func:`sharding.logical_to_spec` (no devices needed)."""

  def __init__(self, data: int, fsdp: int, tensor: int):
    self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


@dataclasses.dataclass
class Plan:
  """The per-device breakdown (bytes) and the verdict."""
  target: Target
  workload: Workload
  mesh: tuple[int, int, int]
  rows: dict[str, float]
  notes: dict[str, str]
  num_params: int
  positions_per_device: int

  @property
  def total(self) -> float:
    return sum(self.rows.values())

  @property
  def capacity(self) -> float:
    return self.target.bytes_per_device * self.target.usable_fraction

  @property
  def fits(self) -> bool:
    return self.total <= self.capacity

  def report(self) -> str:
    w, t = self.workload, self.target
    lines = [f"target: {t.name}; mesh (data, fsdp, tensor) = {self.mesh}",
             (f"workload: global batch {w.global_batch} x {w.seq_len} tokens, grad_accum {w.grad_accum}, "
              f"remat {w.remat_policy}, compute {w.compute_dtype}, params {w.param_dtype}; "
              f"{self.positions_per_device} backbone positions per device per micro-batch"),
             f"parameters: {self.num_params / 1e6:.1f}M trainable"]
    for name, value in self.rows.items():
      lines.append(f"  {name:<12} {_size(value)}   {self.notes.get(name, '')}")
    lines.append(f"  {'total':<12} {_size(self.total)}   of {self.capacity / GB:.1f} GB usable "
                 f"({t.usable_fraction:.0%} of {t.bytes_per_device / GB:.0f} GB)")
    lines.append(f"verdict: {'FITS' if self.fits else 'DOES NOT FIT'} "
                 f"({self.total / self.capacity:.0%} of usable memory)")
    return "\n".join(lines)


def _size(n: float) -> str:
  """Bytes in GB, or in MB below 1 GB (small targets and the CPU-compiled check)."""
  return f"{n / GB:9.2f} GB" if n >= GB else f"{n / 1e6:9.2f} MB"


# --------------------------------------------------------------------------- shapes -> bytes


def _shard_elems(shape, spec, mesh) -> int:
  n = 1
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    n *= math.ceil(dim / math.prod(mesh.shape[a] for a in axes))
  return n


@functools.lru_cache(maxsize=16)
def _shapes_and_axes(cfg) -> tuple[list, list]:
  """Parameter shapes and logical axes of a (frozen, hashable) model config, flattened once per
  config (a plan search calls :func:`plan` many times)."""
  leaves = jax.tree.leaves(models.abstract_params(cfg))
  specs = jax.tree.leaves(models.logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return leaves, specs


def sharded_elements(cfg, mesh_shape: tuple[int, int, int], rules=None) -> tuple[int, int, int]:
  """``(per-device elements, total elements, largest per-device leaf)`` of a model's parameters."""
  mesh = _MeshShape(*mesh_shape)
  leaves, specs = _shapes_and_axes(cfg)
  per_device = [_shard_elems(x.shape, sharding.logical_to_spec(s, mesh, rules, tuple(x.shape)), mesh)
                for x, s in zip(leaves, specs, strict=True)]
  return sum(per_device), sum(int(np.prod(x.shape)) for x in leaves), max(per_device)


def _backbone(cfg) -> LlamaConfig | None:
  return cfg.backbone if isinstance(cfg, (EnergyConfig, TransformerConfig)) else None


# Fraction of the attention's context-proportional bytes (``(H/t)*C*...`` in the formula) that the
# train step keeps on a TPU with splash attention.  Fitted to XLA:TPU's compiles of Transformer-S and
# Transformer-M for v5p:2x4x4 and v5p:4x4x4 at the paper's batch (2026-12-02,
# benchmarks/RESULTS_aot_tpu.json): 0.45 puts the plan at 0.99-1.02 of the compiler's total on all
# four; 0.47 keeps it a few percent above.  The kernel keeps only q, k, v, o and the log-sum-exp;
# what remains context-sized are XLA's buffers around it.
SPLASH_CONTEXT_FACTOR = 0.47


def layer_activation_bytes(bb: LlamaConfig, policy: str, context: int, tensor: int, b: int,
                           platform: str = "gpu") -> float:
  """Bytes one backbone layer keeps per position for the backward pass (formula: module doc)."""
  d, f, h = bb.hidden_size, bb.intermediate_size, bb.num_attention_heads
  dkv = bb.num_key_value_heads * bb.head_dim
  flash = platform == "gpu" and (bb.attention_impl in ("dot_product_attention", "cudnn")
                                 or (bb.attention_impl == "auto" and b <= 2))   # auto: cuDNN in bf16/fp16
  # TPU: 'auto' runs splash attention wherever the context is a multiple of 128
  # (models.attention.resolve); XLA:TPU then keeps SPLASH_CONTEXT_FACTOR of the C-proportional bytes.
  splash = platform == "tpu" and (bb.attention_impl == "splash"
                                  or (bb.attention_impl == "auto" and context % 128 == 0))
  scale = SPLASH_CONTEXT_FACTOR if splash else 1.0
  if policy == "none":
    attn = (h / tensor) * (4 if flash else scale * context * (4 + b))
    return b * (6 * d + (3 * d + 3 * dkv + 4 * f) / tensor) + attn
  if policy == "dots":
    attn = (h / tensor) * (4 if flash else scale * context * b)
    return b * (3 * d + (2 * d + 2 * dkv + 2 * f) / tensor) + attn
  if policy == "dots_no_batch":
    return b * (3 * d + (d + 2 * dkv + 2 * f) / tensor)
  if policy == "full":
    return b * d
  raise ValueError(f"remat_policy: unknown {policy!r}")


def _vocab_block(vocab: int, global_rows: int) -> int:
  from calm_jax.models import losses  # pylint: disable=import-outside-toplevel
  return losses.vocab_block_size(vocab, global_rows)


def logit_bytes_per_token(vocab: int, tensor: int, b: int, global_rows: int, tied: bool) -> tuple[float, str]:
  """Bytes per token of the vocabulary projection's loss working set, and a note.

  Plain path: compute-dtype logits, fp32 log-softmax and its gradient, ``V/t * (b + 8)``, plus for
  the tied projection (the AE) its compute-dtype copy of that gradient (``layers.tied_logits``'
  backward): ``V/t * (2b + 8)``.  Vocabulary-blocked path (``losses.vocab_block_size`` > 0, chosen
  from the *global* row count at trace time): one block's fp32 logits, exponentials and cotangent,
  ``12 c`` with ``c`` the block width.
  """
  c = _vocab_block(vocab, global_rows)
  if c:
    return 12.0 * c, f"vocabulary blocks of {c}: {12.0 * c / 1e3:.0f} kB/token"
  per_token = vocab / tensor * ((2 if tied else 1) * b + 8)
  return per_token, f"logits {per_token / 1e3:.0f} kB/token"


def plan(kind: str, cfg, target: Target, workload: Workload, ae_cfg: AutoencoderConfig | None = None,
         rules: Mapping[str, Any] | None = None) -> Plan:
  """The per-device memory of one training step (see the module docstring)."""
  mesh = target.resolved_mesh()
  data, fsdp, tensor = mesh
  bb = _backbone(cfg)
  base = bb if bb is not None else cfg
  compute = workload.compute_dtype or base.dtype
  pdtype = workload.param_dtype or base.param_dtype
  policy = workload.remat_policy or (bb.remat_policy if bb is not None else "none")
  workload = dataclasses.replace(workload, compute_dtype=compute, param_dtype=pdtype, remat_policy=policy)
  b, pb = _DTYPE_BYTES[compute], _DTYPE_BYTES[pdtype]

  dp = data * fsdp
  if workload.global_batch % (dp * workload.grad_accum):
    raise ValueError(f"global batch {workload.global_batch} is not divisible by data*fsdp*grad_accum = "
                     f"{dp}*{workload.grad_accum}")
  rows_per_device = workload.global_batch // (dp * workload.grad_accum)
  k = cfg.patch_size if isinstance(cfg, (EnergyConfig, AutoencoderConfig)) else 1
  positions = workload.seq_len // k            # backbone positions per sequence (chunks for CALM)
  pos_dev = rows_per_device * positions
  tok_dev = rows_per_device * workload.seq_len

  shard, total, _ = sharded_elements(cfg, mesh, rules)
  rows: dict[str, float] = {}
  notes: dict[str, str] = {}
  rows["params"] = shard * pb
  notes["params"] = f"{total / 1e6:.0f}M x {pb} B / shards"
  if isinstance(cfg, EnergyConfig):
    ae = ae_cfg or AutoencoderConfig(vocab_size=bb.vocab_size, patch_size=k, latent_size=cfg.latent_size)
    ae_shard, ae_total, _ = sharded_elements(ae, mesh, rules)
    rows["frozen AE"] = ae_shard * _DTYPE_BYTES[ae.param_dtype]
    notes["frozen AE"] = f"{ae_total / 1e6:.0f}M, no grads/optimizer"
  rows["optimizer"] = shard * 8
  notes["optimizer"] = "Adam mu + nu, fp32"
  rows["gradients"] = shard * 4 * (2 if workload.grad_accum > 1 else 1)
  notes["gradients"] = "fp32" + (" + fp32 accumulator" if workload.grad_accum > 1 else "")

  # FSDP gathers: one layer (and the prefetched next), plus the largest non-layer matrix.
  if bb is not None:
    layer = (4 * bb.hidden_size * bb.hidden_size * (1 + bb.num_key_value_heads / bb.num_attention_heads) / 2
             + 3 * bb.hidden_size * bb.intermediate_size) / tensor
    big = bb.vocab_size * bb.hidden_size / tensor
    # The baseline's untied LM head is a second vocabulary-sized matrix, gathered (and its gradient
    # whole before the reduce-scatter) beside the embedding's.
    bigs = 2 if isinstance(cfg, TransformerConfig) else 1
    rows["gathered"] = b * (2 * layer + bigs * big) if fsdp > 1 else 0.0
    notes["gathered"] = (f"2 layers + {'embedding + LM head' if bigs == 2 else 'embedding'}, compute dtype"
                         if fsdp > 1 else "no FSDP")

    per_layer = layer_activation_bytes(bb, policy, positions, tensor, b, target.platform)
    acts = bb.num_hidden_layers * per_layer * pos_dev
    if policy != "none":  # one layer re-materialised at a time during the backward pass
      acts += layer_activation_bytes(bb, "none", positions, tensor, b, target.platform) * pos_dev
    notes["activations"] = (f"{bb.num_hidden_layers} layers x {per_layer / 1e3:.1f} kB/position ({policy})"
                            f" x {pos_dev} positions")
    if isinstance(cfg, TransformerConfig):
      extra, notes["non-layer"] = logit_bytes_per_token(bb.vocab_size, tensor, b, tok_dev * dp, tied=False)
    else:
      d = bb.hidden_size
      from calm_jax.models import heads  # pylint: disable=import-outside-toplevel
      head, score = heads.get(cfg).activation_bytes(b)
      extra = b * (k * d + 5 * d) + head + score
      notes["non-layer"] = (f"head {head / 1e3:.0f} kB + loss {score / 1e3:.0f} kB + compression/position")
    rows["activations"] = acts
    rows["non-layer"] = extra * pos_dev
    # The backward pass's working set: the gradients of one layer's activations and of the
    # non-layer activations are live next to everything saved.
    # On TPU the non-layer activations' gradients take their buffers (XLA:TPU's scheduler; measured on
    # the paper's steps compiled for v5p, docs/SHARDING.md): only one layer's are in flight beside them.
    tpu = target.platform == "tpu"
    rows["backward"] = (layer_activation_bytes(bb, "none", positions, tensor, b, target.platform)
                        + (0.0 if tpu else extra)) * pos_dev
    notes["backward"] = "gradients in flight: one layer" + ("" if tpu else " + the non-layer activations")
    if isinstance(cfg, EnergyConfig):
      # The frozen encoder's forward over every target token: transient, but XLA may schedule it
      # while the backbone's saved activations are live (on CPU it does), so it is counted.
      ab = _DTYPE_BYTES[ae.dtype]
      rows["AE encode"] = ab * (2 * ae.hidden_size + 3 * ae.intermediate_size / tensor) * tok_dev
      notes["AE encode"] = f"frozen encoder's forward, {tok_dev} tokens"
  else:  # the autoencoder: MLP-only layers, half per token and half per chunk
    d, f = cfg.hidden_size, cfg.intermediate_size
    layers = (cfg.num_encoder_layers + cfg.num_decoder_layers) / 2 * (1 + 1 / k)
    big = cfg.vocab_size * d / tensor
    # Counted even with the vocabulary-blocked loss: XLA:TPU still gathers the whole tied matrix
    # in some layouts (AE K=4 on v5p:2x4x4 at accum 8: 0.37 GiB compiled, 0.16 planned without it).
    rows["gathered"] = b * (2 * 3 * d * f / tensor + 2 * big) if fsdp > 1 else 0.0
    notes["gathered"] = "embedding + output matrix + 2 layers" if fsdp > 1 else "no FSDP"
    rows["activations"] = layers * b * (3 * d + 4 * f / tensor) * tok_dev
    notes["activations"] = f"{layers:.1f} MLP-layer units x {tok_dev} tokens"
    logits, notes["non-layer"] = logit_bytes_per_token(cfg.vocab_size, tensor, b, tok_dev * dp, tied=True)
    rows["non-layer"] = logits * tok_dev
    tpu = target.platform == "tpu"   # as for the backbone: the logits' gradients reuse their buffers
    rows["backward"] = (b * (3 * d + 4 * f / tensor) + (0.0 if tpu else logits)) * tok_dev
    notes["backward"] = "gradients in flight: one MLP layer" + ("" if tpu else " + the logits")
  return Plan(target, workload, mesh, rows, notes, total, pos_dev)


def smallest_accumulation(kind: str, cfg, target: Target, workload: Workload, ae_cfg=None, rules=None):
  """The smallest ``grad_accum`` (dividing the per-device batch) whose plan fits, or ``None``."""
  dp = math.prod(target.resolved_mesh()[:2])
  per_dev = workload.global_batch // dp
  for acc in range(1, per_dev + 1):
    if per_dev % acc:
      continue
    p = plan(kind, cfg, target, dataclasses.replace(workload, grad_accum=acc), ae_cfg, rules)
    if p.fits:
      return p
  return None


# --------------------------------------------------------------------------- compiled ground truth


def compiled_memory(kind: str, cfg, mesh, workload: Workload, ae_cfg: AutoencoderConfig | None = None,
                    rules=None):
  """``memory_analysis()`` of the real sharded train step, compiled from abstract shapes.

  Nothing is allocated: state and batch are ShapeDtypeStructs.  The step is
  the trainer's (loss and gradients over ``grad_accum`` micro-batches with
  ``optim.accumulate_gradients``, then the AdamW update, state donated), with
  CALM's loss :func:`calm_jax.parallel.sharded_losses.sharded_energy_loss_fn`.
  Returns the ``CompiledMemoryStats`` (per device; ``None`` where the backend
  has no memory analysis).
  """
  import optax

  from calm_jax.parallel import sharded_losses
  from calm_jax.training import optim

  bb = _backbone(cfg)
  if bb is not None and workload.remat_policy and workload.remat_policy != bb.remat_policy:
    bb = bb.replace(remat_policy=workload.remat_policy)
    cfg = cfg.replace(backbone=bb)
  ocfg = optim.OptimConfig()
  tx = optim.make_optimizer(ocfg)
  abstract = models.abstract_params(cfg)
  p_sh = sharding.param_shardings(cfg, mesh, rules)
  st_sh = sharding.state_shardings(tx, abstract, p_sh, mesh)
  st = sharding.abstract_state(tx, abstract, st_sh)
  batch = jax.ShapeDtypeStruct((workload.global_batch, workload.seq_len), np.int32,
                               sharding=sharding.batch_sharding(mesh))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  if kind == "energy":
    loss = sharded_losses.sharded_energy_loss_fn(cfg, ae_cfg, mesh)
    a_sh = sharding.param_shardings(ae_cfg, mesh, rules)
    ae = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      models.abstract_params(ae_cfg), a_sh)
    f = lambda p, t, k, a: loss(p, a, t, k)
  elif kind == "autoencoder":
    f = lambda p, t, k, a: models.autoencoder_loss_fn(cfg, p, t, k, train=True)
    ae = None
  else:
    f = lambda p, t, k, a: models.transformer_loss_fn(cfg, p, t)
    ae = None

  def step(state, tokens, k, ae_params):
    (l, _), grads = optim.accumulate_gradients(lambda p, t, kk: f(p, t, kk, ae_params), state["params"],
                                               tokens, workload.grad_accum, rng=k, has_aux=True)
    updates, opt = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt}, l

  with jax.set_mesh(mesh):
    lowered = jax.jit(step, donate_argnums=(0,), out_shardings=(st_sh, sharding.replicated(mesh))).lower(
        st, batch, key, ae)
    return lowered.compile().memory_analysis()


def describe_compiled(stats) -> str:
  if stats is None:
    return "compiled memory analysis: not available on this backend"
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  parts = [f"{f.removesuffix('_size_in_bytes')} {_size(getattr(stats, f, 0)).strip()}" for f in fields]
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)
  return "compiled step (per device): " + ", ".join(parts) + f"; peak ~ {_size(peak).strip()}"


# --------------------------------------------------------------------------- experiments


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model and its configured workload, from the registry or the paper configs."""
  kind: str
  cfg: Any
  ae_cfg: AutoencoderConfig | None
  global_batch: int
  seq_len: int
  grad_accum: int = 1
  rules: Mapping[str, Any] | None = None
  source: str = ""

  def workload(self, **overrides) -> Workload:
    base = Workload(self.global_batch, self.seq_len, self.grad_accum)
    return dataclasses.replace(base, **overrides)


def resolve_experiment(name: str) -> ModelSpec:
  """A registry experiment (``experiments/registry.py``) or, failing that, a paper config.

  Paper configs (``calm_jax.cost.flops.paper_configs``) get the paper's recipe: 256
  blocks of 8192 tokens (2048 for the AE), bf16 compute with ``dots`` remat
  [assumed: the registry's CALM setting].  Raises KeyError naming the known names.
  """
  from calm_jax.configs import AutoencoderConfig as AE

  try:
    from experiments import registry  # imported lazily: experiments/ is optional for the library
  except ImportError:
    registry = None
  if registry is not None and name in getattr(registry, "EXPERIMENTS", {}):
    c = registry.get_config(name)
    kind = c.kind
    cls = {"autoencoder": AE, "energy": EnergyConfig, "transformer": TransformerConfig}[kind]
    cfg = cls.from_dict(c.model.to_dict(), "model")
    ae_cfg = None
    if kind == "energy":  # the registry names the AE by workdir; take the same-K paper autoencoder
      from calm_jax.cost import flops

      ae_cfg = flops.default_autoencoder(cfg)
    rules = sharding.rules_from_config(c.sharding_rules.to_dict() if "sharding_rules" in c else None)
    accum = int(c.optim.get("grad_accum_steps", 1))
    return ModelSpec(kind, cfg, ae_cfg, int(c.train.global_batch_size), int(c.data.block_length), accum, rules,
                     f"registry {registry.spec(name)}")
  from calm_jax.cost import flops

  papers = flops.paper_configs()
  if name not in papers:
    known = sorted(set(papers) | set(getattr(registry, "EXPERIMENTS", {}) if registry else ()))
    raise KeyError(f"unknown experiment {name!r} (known: {', '.join(known)})")
  kind, cfg, *rest = papers[name]
  bb = cfg.backbone.replace(dtype="bfloat16", scan_layers=True, remat_policy="dots")
  cfg = cfg.replace(backbone=bb)
  return ModelSpec(kind, cfg, rest[0] if rest else None, 256, 8192, 1, None, "flops.paper_configs()")
