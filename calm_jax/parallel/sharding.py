"""Device meshes, the logical-axis rules table, and sharded parameters/state/batches.

The mesh has three axes, any of which may be 1:

  ``data``    pure data parallelism: parameters replicated across it;
  ``fsdp``    data parallelism whose members also split the parameters and the
              optimiser state (ZeRO-3 / FSDP): each weight is gathered just
              before use and gradients are reduce-scattered;
  ``tensor``  tensor (Megatron) parallelism over attention heads and MLP width.

Batches are split over ``data`` x ``fsdp``.  Model code names its axes
logically (``embed``, ``mlp``, ``heads``, ... see :func:`calm_jax.models.logical_axes`);
:data:`DEFAULT_RULES` alone maps them to mesh axes, and ``config.sharding_rules``
overrides entries of it (:func:`rules_from_config`; :func:`rules_config` gives
the whole table as config strings).  User guide: docs/SHARDING.md.

Resolution of one array's spec (:func:`logical_to_spec`): each dimension takes
the mesh axes its logical name maps to, unless a mesh axis is already used by
an earlier dimension of the same array or the dimension is not divisible by the
axes' size (then that dimension stays replicated; JAX needs even shards).  When
shapes are known and an array of at least :data:`FSDP_MIN_SIZE` elements ended
up without ``fsdp`` (e.g. the autoencoder's ``(patch, mlp)`` kernel), its largest
still-free divisible dimension is put on ``fsdp``, so that every large parameter
is split across the FSDP group.

Axis types.  The mesh is built with ``AxisType.Auto`` by default (always passed
explicitly, the default changed between JAX versions): the model code carries
no sharding-in-types annotations, so XLA's propagation places activations from
the parameter and batch shardings plus the constraints of :func:`constrain`.
``jax.shard_map`` is used where per-device work is the point
(:mod:`calm_jax.parallel.sharded_losses`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any
P = PartitionSpec
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# One table for every model.  Values: a mesh axis, a tuple of mesh axes, or None.
DEFAULT_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",       # embedding rows / LM-head columns split over tensor
    "embed": "fsdp",         # the model width: the FSDP axis of every matrix
    "mlp": "tensor",         # MLP hidden width (column- then row-parallel)
    "heads": "tensor",       # query heads
    "kv_heads": "tensor",    # key/value heads (replicated when they do not divide)
    "head_dim": None,
    "latent": None,          # tiny (L = 128)
    "noise": None,
    "patch": None,           # K*D or K*V; gets fsdp by the large-array fallback
    "norm": None,            # norm scales / biases: small, replicated
    "layers": None,          # the scanned layer axis is never split
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_vocab": "tensor",
}

# Arrays smaller than this are not force-split over fsdp (gathering many small
# shards costs more latency than it saves memory).
FSDP_MIN_SIZE = 2**14


class ShardingError(ValueError):
  """A mesh or rules setting is invalid; the message names the config key."""


# --------------------------------------------------------------------------- mesh


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, num_devices: int | None = None) -> tuple:
  """Resolve ``-1`` (all remaining devices; at most one axis) to a concrete ``(data, fsdp, tensor)``."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ShardingError(f"config.mesh: at most one axis may be -1, got {sizes}")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ShardingError(f"config.mesh.{k}: must be a positive int or -1, got {v}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise ShardingError(f"config.mesh: {n} devices are not divisible by the fixed axes {sizes}")
    sizes[free[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise ShardingError(f"config.mesh: {sizes} needs {math.prod(sizes.values())} devices, have {n}")
  return (sizes["data"], sizes["fsdp"], sizes["tensor"])


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None,
              axis_type: jax.sharding.AxisType = jax.sharding.AxisType.Auto) -> jax.sharding.Mesh:
  """A mesh with axes ``('data', 'fsdp', 'tensor')``; ``-1`` takes the remaining devices.

  Args:
    data, fsdp, tensor: axis sizes (``config.mesh``).
    devices: the devices to use (default all, in ``jax.make_mesh``'s
      topology-aware order).
    axis_type: the type of all three axes, passed explicitly (see module doc).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * 3, devices=devices)


def mesh_from_config(mesh_cfg: Mapping[str, int] | None, devices=None) -> jax.sharding.Mesh:
  """``config.mesh`` ({data, fsdp, tensor}) -> mesh; missing keys: data 1, fsdp -1, tensor 1."""
  mesh_cfg = dict(mesh_cfg or {})
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ShardingError(f"config.mesh: unknown axes {sorted(unknown)} (known: {AXES})")
  return make_mesh(mesh_cfg.get("data", 1), mesh_cfg.get("fsdp", -1), mesh_cfg.get("tensor", 1), devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------- rules


def rules_from_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """DEFAULT_RULES with ``config.sharding_rules`` entries replaced.

  Values may be None, a mesh axis name, ``'a,b'``, ``''`` (replicated) or a
  list/tuple of names; unknown mesh
  axes are an error naming ``config.sharding_rules.<name>``.
  """
  rules = dict(DEFAULT_RULES)
  for name, value in dict(overrides or {}).items():
    axes = _as_axes(value)
    bad = [a for a in axes if a not in AXES]
    if bad:
      raise ShardingError(f"config.sharding_rules.{name}: unknown mesh axis {bad[0]!r} (known: {AXES})")
    rules[name] = None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))
  return rules


def rules_config(rules: Mapping[str, Any] | None = None) -> dict[str, str]:
  """The rules table as config strings (``'fsdp'``, ``'data,fsdp'``, ``''`` = replicated).

  For ``config.sharding_rules`` in an experiment's skeleton: with every entry
  present (and a string), each one can be overridden on the command line, e.g.
  ``--config.sharding_rules.mlp=fsdp,tensor`` (a locked ConfigDict rejects new keys).
  ``rules_from_config(rules_config())`` is ``DEFAULT_RULES``.
  """
  return {name: ",".join(_as_axes(value)) for name, value in dict(DEFAULT_RULES if rules is None else rules).items()}


def _as_axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):  # 'fsdp', 'data,fsdp' or '' (replicated), as config strings allow
    return tuple(a.strip() for a in value.split(",") if a.strip())
  return tuple(value)


def logical_to_spec(logical: PartitionSpec | tuple, mesh, rules: Mapping[str, Any] | None = None,
                    shape: tuple[int, ...] | None = None, fsdp_fallback: bool = True) -> PartitionSpec:
  """One array's logical names -> a mesh PartitionSpec (resolution rules: module doc).

  ``fsdp_fallback`` False (activations, :func:`constrain`): no large-array fallback onto ``fsdp``.
  """
  rules = DEFAULT_RULES if rules is None else rules
  used: set[str] = set()
  out: list[Any] = []
  for i, name in enumerate(tuple(logical)):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ShardingError(f"sharding rules: no entry for logical axis {name!r} (add it to config.sharding_rules)")
    axes = [a for a in _as_axes(rules[name]) if mesh.shape[a] > 1 and a not in used]
    if shape is not None:
      # Keep the longest prefix of the axes whose product divides the dimension.
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    used.update(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
  if (fsdp_fallback and shape is not None and "fsdp" not in used and mesh.shape["fsdp"] > 1
      and math.prod(shape) >= FSDP_MIN_SIZE):
    free = [i for i, a in enumerate(out) if a is None and shape[i] % mesh.shape["fsdp"] == 0]
    if free:
      out[max(free, key=lambda i: shape[i])] = "fsdp"
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def logical_to_shardings(mesh, logical_axes_tree: PyTree, rules: Mapping[str, Any] | None = None,
                         shapes: PyTree | None = None) -> PyTree:
  """Tree of logical PartitionSpecs -> tree of NamedShardings on ``mesh``.

  ``shapes`` (a matching tree of arrays / ShapeDtypeStructs) enables the
  divisibility checks and the FSDP fallback; always pass it for parameters.
  """
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(s, mesh, rules)), logical_axes_tree,
                        is_leaf=_is_spec)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, logical_to_spec(s, mesh, rules, tuple(x.shape))),
                      logical_axes_tree, shapes, is_leaf=_is_spec)


def param_shardings(cfg, mesh, rules: Mapping[str, Any] | None = None) -> PyTree:
  """NamedShardings of a model config's parameters (from its logical axes and shapes)."""
  from calm_jax import models  # models imports nothing from here; keep the import graph one-way

  return logical_to_shardings(mesh, models.logical_axes(cfg), rules, models.abstract_params(cfg))


def init_sharded(cfg, key, mesh, rules: Mapping[str, Any] | None = None) -> PyTree:
  """Fresh parameters materialised directly into their shardings (never whole on one device)."""
  from calm_jax import models

  shardings = param_shardings(cfg, mesh, rules)
  return jax.jit(lambda k: models.init_params(cfg, k), out_shardings=shardings)(key)


def shard_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """Move existing arrays (e.g. the frozen autoencoder's params) onto ``shardings``."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# --------------------------------------------------------------------------- train state


def opt_state_shardings(optimizer, abstract_params: PyTree, params_shardings: PyTree, mesh) -> PyTree:
  """Shardings of ``optimizer.init(params)``: parameter-shaped parts (Adam mu/nu,
  MultiSteps' accumulators) follow the parameters, everything else (counts,
  scalars) is replicated.  Built with ``optax.tree_map_params`` on the abstract
  state, so any optax chain/partition/mask structure is followed.
  """
  import optax

  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  rep = replicated(mesh)
  return optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state, params_shardings,
      transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))


def state_shardings(optimizer, abstract_params: PyTree, params_shardings: PyTree, mesh) -> dict:
  """Shardings of the train state ``{'step', 'params', 'opt_state'}`` (layout (b) of the contracts)."""
  return {
      "step": replicated(mesh),
      "params": params_shardings,
      "opt_state": opt_state_shardings(optimizer, abstract_params, params_shardings, mesh),
  }


def abstract_state(optimizer, abstract_params: PyTree, shardings: dict) -> dict:
  """ShapeDtypeStructs (with shardings) of the train state: the restore target of a checkpoint."""
  tree = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "opt_state": jax.eval_shape(optimizer.init, abstract_params),
  }
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def init_state_sharded(cfg, optimizer, key, mesh, rules: Mapping[str, Any] | None = None):
  """``(state, shardings)``: a fresh train state built directly in its shardings."""
  from calm_jax import models

  abstract = models.abstract_params(cfg)
  p_sh = param_shardings(cfg, mesh, rules)
  shardings = state_shardings(optimizer, abstract, p_sh, mesh)

  def fresh(k):
    params = models.init_params(cfg, k)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  return jax.jit(fresh, out_shardings=shardings)(key), shardings


# --------------------------------------------------------------------------- batches and activations


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[B, ...]`` batch: rows split over ``data`` x ``fsdp``."""
  del ndim  # trailing dimensions are replicated: P(batch_axes) already says so
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh) -> int:
  """The global batch must be a multiple of this (devices over data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(mesh, host_batch: PyTree) -> PyTree:
  """This process's rows of the global batch -> global arrays sharded by :func:`batch_sharding`.

  Single process: ``host_batch`` is the whole batch.  Multi-process: each
  process passes its own consecutive slice (``global_batch / process_count``
  rows, the slice grain reads for this process), and the result is one global
  array built with ``jax.make_array_from_process_local_data``.
  """
  sharding = batch_sharding(mesh)

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ShardingError("put_batch: batch leaves need a leading batch axis")
    if (x.shape[0] * jax.process_count()) % batch_divisor(mesh):
      raise ShardingError(
          f"put_batch: global batch {x.shape[0] * jax.process_count()} is not divisible by data*fsdp="
          f"{batch_divisor(mesh)} (config.train.global_batch_size vs config.mesh)")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(one, host_batch)


# The rules table that :func:`constrain` reads while a step is traced (``config.sharding_rules``
# applied: :func:`with_rules`); DEFAULT_RULES when none is active.
_ACTIVE_RULES: list[Mapping[str, Any] | None] = [None]


@contextlib.contextmanager
def use_rules(rules: Mapping[str, Any] | None):
  """Make ``rules`` the table :func:`constrain` resolves activations with, for the block's traces."""
  _ACTIVE_RULES.append(rules)
  try:
    yield
  finally:
    _ACTIVE_RULES.pop()


def with_rules(fn, rules: Mapping[str, Any] | None):
  """``fn`` traced under :func:`use_rules` (``rules``): how the loop's jitted step sees the config's table."""
  if rules is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with use_rules(rules):
      return fn(*args, **kwargs)

  return traced


def constrain(x, logical: tuple, mesh=None, rules: Mapping[str, Any] | None = None):
  """Constrain an activation's sharding by its logical axis names, through the rules table.

  The one helper the model code calls at its block boundaries (``('batch',
  'length', 'act_embed')`` for the residual stream, ``'act_heads'`` /
  ``'act_mlp'`` / ``'act_vocab'`` inside): it pins activations to the batch
  split (and tensor-parallel widths), so that XLA's propagation moves the
  FSDP-sharded *weights* to the activations -- an all-gather of each weight --
  instead of gathering the batch and repeating the work on every device.
  Resolution as :func:`logical_to_spec`, without the large-array fallback;
  a dimension not divisible by its mesh axes stays unconstrained.

  A no-op outside ``jit`` under a mesh (``jax.set_mesh``) and inside
  ``jax.shard_map`` over any manual axis (the per-device code already holds
  its own rows).  ``rules`` defaults to the active table (:func:`use_rules`),
  else :data:`DEFAULT_RULES`.
  """
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or getattr(mesh, "manual_axes", ()):
    return x
  rules = rules if rules is not None else (_ACTIVE_RULES[-1] or DEFAULT_RULES)
  if len(logical) != x.ndim:
    raise ShardingError(f"constrain: {len(logical)} logical names {tuple(logical)} for an array of shape {x.shape}")
  spec = logical_to_spec(logical, mesh, rules, tuple(x.shape), fsdp_fallback=False)
  # Dimensions left without mesh axes are pinned replicated, except where a name maps to axes that did
  # not divide (left to the compiler: P.UNCONSTRAINED).
  dims = list(spec) + [None] * (x.ndim - len(spec))
  for i, name in enumerate(logical):
    if dims[i] is None and name is not None and _as_axes(rules.get(name)):
      if any(mesh.shape[a] > 1 for a in _as_axes(rules[name])):
        dims[i] = P.UNCONSTRAINED
  if isinstance(mesh, jax.sharding.Mesh):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*dims)))
  return jax.lax.with_sharding_constraint(x, P(*dims))


def constrain_rows(x, last: str = "act_embed"):
  """:func:`constrain` of an activation ``[rows, ..., width]``: rows on ``batch``, the width by ``last``."""
  return constrain(x, ("batch",) + (None,) * (x.ndim - 2) + (last,))


# --------------------------------------------------------------------------- multi-host


def initialize_distributed() -> bool:
  """``jax.distributed.initialize`` when the environment says this is a multi-process job.

  Triggers: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``), or a cluster JAX auto-detects (SLURM with more than one
  task, Cloud TPU pods with more than one host: ``CALM_DISTRIBUTED=1`` forces
  the auto-detecting call).  Otherwise a no-op.  Returns True if it initialised.
  Must run before anything touches a device.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")))
    return True
  if env.get("CALM_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def describe(mesh) -> str:
  """One line for the launch log: mesh shape, devices, processes."""
  shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return (f"mesh {shape} ({mesh.devices.size} {jax.devices()[0].platform} devices, "
          f"process {jax.process_index()}/{jax.process_count()})")
