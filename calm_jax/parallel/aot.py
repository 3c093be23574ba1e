"""Ahead-of-time compilation of the real train step: for simulated CPU devices or a TPU topology.

Nothing is allocated and nothing runs: the train state, the batch, the key and
CALM's frozen autoencoder are ``ShapeDtypeStruct``s carrying their shardings,
and the step is the one the loop jits (:func:`calm_jax.training.train.jit_train_step`:
the experiment's model, optimizer, ``grad_accum_steps``, remat and dtypes, the
same in/out shardings and donation).  What XLA reports about the compiled
program is the ground truth the analytic plan (:mod:`calm_jax.cost.memory`) is
checked against:

  ``memory_analysis()``  per device: arguments (the donated state, the batch,
                         the frozen AE), outputs, aliased bytes (donation) and
                         temporaries (everything else live at the peak);
  ``cost_analysis()``    per device FLOPs of the partitioned program.

TPU targets without a TPU: ``jax.experimental.topologies.get_topology_desc``
(libtpu from ``pip install -e '.[tpu]'``) describes a slice such as
``v5p:2x4x4``; its devices build the mesh and XLA:TPU compiles for them on this
host.  ``TPU_SKIP_MDS_QUERY=1`` (set by :func:`tpu_topology`) keeps libtpu from
asking a GCE metadata server for the machine it is on.  When the step does not
fit, XLA:TPU's out-of-memory error is returned as a verdict
(:class:`CompiledStep` with ``error``), not raised.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp

from calm_jax.parallel import sharding

GIB = 2**30

# Per chip: HBM bytes and dense bf16 peak FLOP/s (public spec sheets).  The topology names are
# libtpu's: 'v4:2x2x2', 'v5e:4x4' (also 'v5litepod'), 'v5p:2x4x4', 'v6e:4x4'.
TPU_CHIPS = {
    "v4": (32 * GIB, 275e12),
    "v5e": (16 * GIB, 197e12),
    "v5p": (95 * GIB, 459e12),
    "v6e": (32 * GIB, 918e12),
}
_GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


@dataclasses.dataclass
class CompiledStep:
  """What the compiler says about one train step, per device (bytes, FLOPs).

  ``error`` is set (and the sizes are what the error message reports, if
  anything) when compilation failed for lack of memory.
  """
  target: str
  mesh: tuple[int, int, int]
  num_devices: int
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  code_bytes: float = 0.0
  flops: float = 0.0
  capacity_bytes: float | None = None
  peak_flops: float | None = None
  error: str = ""

  @property
  def total_bytes(self) -> float:
    """Live bytes at the peak: arguments + outputs not aliased to them + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool | None:
    """The compiler's verdict: False on an out-of-memory error; None without a known capacity."""
    if self.error:
      return False
    if self.capacity_bytes is None:
      return None
    return self.total_bytes <= self.capacity_bytes

  def mfu_bound(self, tokens_per_step: float, model_flops_per_token: float) -> float | None:
    """Best possible MFU: the model FLOPs per chip over the XLA FLOPs per chip at chip peak.

    The step can at best run at the chip's peak for the FLOPs XLA executes;
    MFU counts the model's FLOPs only, so its upper bound is their ratio.
    """
    if not self.flops or self.error:
      return None
    return tokens_per_step * model_flops_per_token / self.num_devices / self.flops

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["total_bytes"] = self.total_bytes
    d["fits"] = self.fits
    return d

  def report(self) -> str:
    if self.error:
      return (f"compiler ({self.target}, mesh {self.mesh}): DOES NOT FIT -- {self.error}")
    gib = lambda n: f"{n / GIB:.2f} GiB"
    lines = [f"compiler ({self.target}, mesh (data, fsdp, tensor) = {self.mesh}), per device:",
             f"  arguments    {gib(self.argument_bytes)}",
             f"  outputs      {gib(self.output_bytes)}  ({gib(self.alias_bytes)} aliased to the donated state)",
             f"  temporaries  {gib(self.temp_bytes)}",
             f"  total        {gib(self.total_bytes)}"
             + (f"  of {gib(self.capacity_bytes)}" if self.capacity_bytes else ""),
             f"  FLOPs        {self.flops:.4g} per device per step"]
    if self.fits is not None:
      lines.append(f"compiler verdict: {'FITS' if self.fits else 'DOES NOT FIT'}"
                   f" ({self.total_bytes / self.capacity_bytes:.0%} of HBM)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- targets


def tpu_generation(topology: str) -> str:
  """``'v5p:2x4x4'`` -> ``'v5p'`` (``v5litepod`` -> ``v5e``)."""
  gen = topology.split(":")[0].split("-")[0].lower()
  return _GENERATION_ALIASES.get(gen, gen)


def tpu_chip(topology: str) -> tuple[float, float]:
  """``(HBM bytes, bf16 peak FLOP/s)`` of one chip of the topology's generation."""
  gen = tpu_generation(topology)
  if gen not in TPU_CHIPS:
    raise ValueError(f"--topology {topology!r}: unknown TPU generation {gen!r} (known: {', '.join(TPU_CHIPS)})")
  return TPU_CHIPS[gen]


def tpu_topology_chips(topology: str) -> int:
  """Chips of a topology name, from its shape (``v5p:2x4x4`` -> 32)."""
  m = re.fullmatch(r"[^:]+:(\d+(?:x\d+)*)", topology)
  if not m:
    raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC], e.g. v5p:2x4x4")
  return math.prod(int(x) for x in m.group(1).split("x"))


def have_libtpu() -> bool:
  """Whether the libtpu package (``pip install -e '.[tpu]'``) is importable here."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology(topology: str):
  """The devices of a TPU slice (``'v5p:2x4x4'``), described by libtpu with no TPU present."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")   # no metadata server to ask either
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")     # compiling only: no chip to share
  if not have_libtpu():
    raise RuntimeError("TPU topologies need libtpu: pip install -e '.[tpu]'")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return list(desc.devices)


# --------------------------------------------------------------------------- the step


def abstract_inputs(exp, mesh, rules, state_shardings):
  """``(state, batch, key, ae_params)`` of the train step as sharded ShapeDtypeStructs."""
  from calm_jax import models  # pylint: disable=import-outside-toplevel
  from calm_jax.training import trainers  # pylint: disable=import-outside-toplevel

  tx = trainers.make_optimizer(exp.optim)
  state = sharding.abstract_state(tx, models.abstract_params(exp.model), state_shardings)
  batch = {"tokens": jax.ShapeDtypeStruct((exp.train.global_batch_size, exp.data.block_length), jnp.int32,
                                          sharding=sharding.batch_sharding(mesh))}
  key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype   # nothing runs (a topology mesh cannot)
  key = jax.ShapeDtypeStruct((), key_dtype, sharding=sharding.replicated(mesh))
  ae = None
  if exp.kind == "energy":
    ae_sh = sharding.param_shardings(exp.ae_model, mesh, rules)
    ae = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      models.abstract_params(exp.ae_model), ae_sh)
  return state, batch, key, ae


def lower_train_step(exp, mesh, rules=None):
  """The loop's jitted train step of ``exp`` (a resolved :class:`calm_jax.training.train.Experiment`)
  lowered for ``mesh`` from abstract inputs."""
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel

  rules = sharding.rules_from_config(exp.sharding_rules) if rules is None else rules
  step_jit, state_sh = train.jit_train_step(exp, mesh, rules)
  with jax.set_mesh(mesh):
    return step_jit.lower(*abstract_inputs(exp, mesh, rules, state_sh))


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds? (?:the )?(?:available )?memory|Ran out of memory")


def _first_line_of(err: Exception) -> str:
  msg = str(err)
  for line in msg.splitlines():
    if _OOM.search(line):
      return line.strip()[:400]
  return msg.strip().splitlines()[0][:400] if msg.strip() else type(err).__name__


def compile_train_step(exp, mesh, rules=None, *, target: str = "", capacity_bytes: float | None = None,
                       peak_flops: float | None = None) -> CompiledStep:
  """Compile the step for ``mesh`` and read XLA's per-device memory and FLOPs.

  Out of memory at compile time (XLA:TPU checks the program against HBM) is
  returned as ``CompiledStep(error=...)``; any other failure is raised.
  """
  shape = tuple(int(mesh.shape[a]) for a in sharding.AXES)
  out = CompiledStep(target or f"{mesh.devices.size} {mesh.devices.flat[0].platform} devices", shape,
                     int(mesh.devices.size), capacity_bytes=capacity_bytes, peak_flops=peak_flops)
  try:
    compiled = lower_train_step(exp, mesh, rules).compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError's type moved between versions
    if _OOM.search(str(e)):
      out.error = _first_line_of(e)
      return out
    raise
  fill_stats(out, compiled)
  return out


def fill_stats(out: CompiledStep, compiled) -> CompiledStep:
  """Copy ``memory_analysis()`` and ``cost_analysis()['flops']`` of ``compiled`` into ``out``."""
  stats = compiled.memory_analysis()
  if stats is not None:
    out.argument_bytes = float(stats.argument_size_in_bytes)
    out.output_bytes = float(stats.output_size_in_bytes)
    out.alias_bytes = float(stats.alias_size_in_bytes)
    out.temp_bytes = float(stats.temp_size_in_bytes)
    out.code_bytes = float(stats.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
    cost = cost[0] if cost else {}
  out.flops = float((cost or {}).get("flops", 0.0))
  return out


def compile_for_tpu(exp, topology: str, mesh_shape=(1, -1, 1), rules=None) -> CompiledStep:
  """Compile ``exp``'s train step for the TPU slice ``topology`` (e.g. ``'v5p:2x4x4'``) on this host.

  ``mesh_shape`` is ``(data, fsdp, tensor)`` over the slice's chips (one entry may be -1).
  """
  devices = tpu_topology(topology)
  hbm, peak = tpu_chip(topology)
  mesh = sharding.make_mesh(*mesh_shape, devices=devices)
  return compile_train_step(exp, mesh, rules, target=f"TPU {topology} ({len(devices)} chips)",
                            capacity_bytes=hbm, peak_flops=peak)


def cpu_mesh(mesh_shape, num_devices: int | None = None):
  """A mesh over the first ``num_devices`` CPU devices (simulated: ``jax_num_cpu_devices``)."""
  devices = jax.devices("cpu")
  if num_devices is None:
    num_devices = len(devices) if -1 in tuple(mesh_shape) else math.prod(mesh_shape)
  n = num_devices
  if n > len(devices):
    raise ValueError(f"mesh {tuple(mesh_shape)} needs {n} devices, this process has {len(devices)} "
                     "(set jax_num_cpu_devices before JAX starts)")
  return sharding.make_mesh(*mesh_shape, devices=devices[:n])


def experiment(name_or_config, *, global_batch: int | None = None, grad_accum: int | None = None,
               remat: str | None = None, mesh: dict | None = None, seq_len: int | None = None,
               dtype: str | None = None, param_dtype: str | None = None):
  """A resolved Experiment from a registry name (``'transformer_s'``), a ``file.py:arg`` spec or a
  config, with the workload overridden (paths are not checked: nothing is read).

  ``dtype`` / ``param_dtype``: the compute and parameter dtypes of the model (its backbone's for
  CALM and the baseline); ``remat``: the backbone's remat policy (the autoencoder has none).
  """
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel

  config = name_or_config
  if isinstance(config, str):
    config = _load_config(config)
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  d = _deep_copy(d)
  if global_batch is not None:
    d["train"]["global_batch_size"] = int(global_batch)
    d["train"]["eval_batch_size"] = int(global_batch)
  if grad_accum is not None:
    d["optim"]["grad_accum_steps"] = int(grad_accum)
  if seq_len is not None:
    d["data"]["block_length"] = int(seq_len)
  if remat is not None and d["kind"] != "autoencoder":
    d["model"]["backbone"]["remat_policy"] = remat
  model = d["model"] if d["kind"] == "autoencoder" else d["model"]["backbone"]
  if dtype is not None:
    model["dtype"] = dtype
  if param_dtype is not None:
    model["param_dtype"] = param_dtype
  if mesh is not None:
    d["mesh"] = dict(mesh)
  return train.resolve(d, check_paths=False)


def _deep_copy(d):
  if isinstance(d, dict):
    return {k: _deep_copy(v) for k, v in d.items()}
  if isinstance(d, list):
    return [_deep_copy(v) for v in d]
  return d


def _load_config(spec: str):
  """A registry name or ``experiments/<file>.py:<arg>`` (the path prefix optional)."""
  from experiments import registry  # pylint: disable=import-outside-toplevel

  if spec in registry.EXPERIMENTS:
    return registry.get_config(spec)
  file, _, arg = spec.partition(":")
  file = os.path.basename(file).removesuffix(".py")
  import importlib  # pylint: disable=import-outside-toplevel
  try:
    module = importlib.import_module(f"experiments.{file}")
  except ImportError:
    raise KeyError(f"--experiment {spec!r}: not a registry name nor experiments/<file>.py[:arg] "
                   f"(known names: {', '.join(registry.EXPERIMENTS)})") from None
  return module.get_config(arg or None)


def step_matmul_flops(exp, mesh, rules=None) -> float:
  """The matmul FLOPs one train step executes, over all devices: remat's recomputation and every
  micro-batch included (the traced program, loops unrolled in the count)."""
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel

  rules = sharding.rules_from_config(exp.sharding_rules) if rules is None else rules
  step_jit, state_sh = train.jit_train_step(exp, mesh, rules)
  with jax.set_mesh(mesh):
    jaxpr = step_jit.trace(*abstract_inputs(exp, mesh, rules, state_sh)).jaxpr
  from calm_jax.cost import xla_cost  # pylint: disable=import-outside-toplevel
  return xla_cost.jaxpr_matmul_flops(jaxpr.jaxpr)


def model_flops_per_step(exp) -> float:
  """The analytic model FLOPs of one step (``calm_jax.cost.flops``), for the MFU bound."""
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel
  return train.train_flops_per_token(exp) * exp.train.global_batch_size * exp.data.block_length


def ideal_ratio(step: CompiledStep, one_device_flops: float) -> float:
  """Per-device FLOPs over one device's FLOPs / devices (1.0: the work is divided perfectly)."""
  return step.flops / (one_device_flops / step.num_devices)


__all__ = ["CompiledStep", "TPU_CHIPS", "compile_for_tpu", "compile_train_step", "cpu_mesh", "experiment",
           "fill_stats", "have_libtpu", "ideal_ratio", "lower_train_step", "model_flops_per_step",
           "tpu_chip", "tpu_topology", "tpu_topology_chips"]
