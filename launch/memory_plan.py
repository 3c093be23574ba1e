"""Per-device memory plan of a training run on a target; optionally the compiled step's analysis.

  # The acceptance verdicts: CALM-XL on 8 x 80 GB GPUs and on a TPU v5p-32, FSDP.
  python -m launch.memory_plan --experiment=calm_xl --target=gpu8x80 --target=v5p-32

  # Any experiment / paper config on any target, with overrides:
  python -m launch.memory_plan --experiment=transformer_l --devices=4 --memory_gb=40 \\
      --mesh=1,2,2 --global_batch=64 --seq_len=2048 --remat=full --grad_accum=2

  # Small models: also compile the real sharded step on fake CPU devices.
  python -m launch.memory_plan --experiment=calm_tiny --devices=8 --memory_gb=16 --mesh=2,2,2 --compile

  # A TPU slice, with no TPU here (needs libtpu: pip install -e '.[tpu]'): the compiler's per-chip
  # arguments / temporaries / outputs and FLOPs beside the plan, and the compiler's verdict.
  python -m launch.memory_plan --experiment=transformer_s --topology=v5p:2x4x4 --global_batch=32

  # The recipe of each paper experiment (compiled, cached in benchmarks/RESULTS_aot_tpu.json)
  # and the plan-vs-compiler comparison, written into docs/SHARDING.md:
  python -m launch.memory_plan --recipes --write_docs

``--experiment`` takes a name of ``experiments/registry.py`` (its model,
global batch, block length, remat policy and grad accumulation are the
defaults) or, when the registry is unavailable, a ``calm_jax.cost.flops.paper_configs()``
name.  The numbers are explained in :mod:`calm_jax.cost.memory`.  With
``--topology`` the step compiled for the slice (:mod:`calm_jax.parallel.aot`:
the experiment's config, mesh, grad_accum, remat and dtypes, built by the
loop's own ``train.jit_train_step``) decides the verdict; out of memory at
compile time is printed as DOES NOT FIT.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experiment", help="a registry name (experiments/registry.py) or a paper config name")
  p.add_argument("--target", action="append", default=[], help="a named target: gpu8x80 | v5p-32")
  p.add_argument("--devices", type=int)
  p.add_argument("--memory_gb", type=float)
  p.add_argument("--mesh", help="data,fsdp,tensor (one may be -1)")
  p.add_argument("--platform", default="gpu", choices=("gpu", "tpu", "cpu"))
  p.add_argument("--global_batch", type=int)
  p.add_argument("--seq_len", type=int)
  p.add_argument("--grad_accum", type=int)
  p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"))
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--param_dtype", choices=("float32", "bfloat16"))
  p.add_argument("--usable_fraction", type=float, default=0.9)
  p.add_argument("--compile", action="store_true",
                 help="also compile the step on --devices fake CPU devices and print memory_analysis()")
  p.add_argument("--topology", action="append", default=[],
                 help="a TPU slice, e.g. v5p:4x4x4 or v5e:4x4: compile the step for it (needs libtpu)")
  p.add_argument("--recipes", action="store_true",
                 help="find (or read from the cache) a fitting recipe for each of the paper's seven experiments")
  p.add_argument("--write_docs", action="store_true", help="with --recipes: rewrite docs/SHARDING.md's table")
  p.add_argument("--force", action="store_true", help="with --recipes: recompile what the cache holds")
  p.add_argument("--from_cache", action="store_true",
                 help="with --recipes: compile nothing; the table from benchmarks/RESULTS_aot_tpu.json")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.compile and args.devices:
    # Must precede JAX's backend start: one fake CPU device per target device.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)

  from calm_jax.cost import memory
  from calm_jax.parallel import sharding

  if args.recipes:
    return _recipes(args)
  if not args.experiment:
    print("memory_plan: give --experiment (or --recipes)", file=sys.stderr)
    return 2
  if args.topology:
    return _topologies(args)
  try:
    model = memory.resolve_experiment(args.experiment)
  except KeyError as e:
    print(f"memory_plan: {e.args[0]}", file=sys.stderr)
    return 2
  targets = [memory.TARGETS[t] for t in args.target if t in memory.TARGETS]
  unknown = [t for t in args.target if t not in memory.TARGETS]
  if unknown:
    print(f"memory_plan: unknown --target {unknown[0]!r} (known: {', '.join(memory.TARGETS)})", file=sys.stderr)
    return 2
  if args.devices:
    mesh = tuple(int(x) for x in (args.mesh or "1,-1,1").split(","))
    if len(mesh) != 3:
      print("memory_plan: --mesh needs three sizes data,fsdp,tensor", file=sys.stderr)
      return 2
    if not args.memory_gb:
      print("memory_plan: --devices needs --memory_gb", file=sys.stderr)
      return 2
    targets.append(memory.Target(f"{args.devices} devices x {args.memory_gb:g} GB, mesh {mesh}", args.devices,
                                 args.memory_gb * memory.GB, mesh, args.usable_fraction, args.platform))
  if not targets:
    print("memory_plan: give --target and/or --devices/--memory_gb", file=sys.stderr)
    return 2

  given = {"global_batch": args.global_batch, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
           "remat_policy": args.remat, "compute_dtype": args.dtype, "param_dtype": args.param_dtype}
  overrides = {k: v for k, v in given.items() if v is not None}
  workload = model.workload(**overrides)
  print(f"experiment {args.experiment}: kind {model.kind} ({model.source})")
  for target in targets:
    print()
    try:
      p = memory.plan(model.kind, model.cfg, target, workload, model.ae_cfg, model.rules)
    except (ValueError, sharding.ShardingError) as e:
      print(f"target {target.name}: {e}")
      continue
    print(p.report())
    if not p.fits:
      better = memory.smallest_accumulation(model.kind, model.cfg, target, workload, model.ae_cfg, model.rules)
      if better is None:
        print("  no gradient accumulation makes it fit at this batch: try remat 'full', a bf16 optimizer "
              "state, or more devices")
      else:
        print(f"  fits with grad_accum={better.workload.grad_accum}: {better.total / memory.GB:.2f} GB "
              f"({better.total / better.capacity:.0%} of usable)")
    if args.compile and target.num_devices == args.devices:
      import jax

      if jax.device_count() != target.num_devices:
        print(f"  (compile skipped: {jax.device_count()} devices here, target has {target.num_devices})")
        continue
      from calm_jax.parallel import aot

      exp = _experiment(args)
      mesh = sharding.make_mesh(*target.resolved_mesh())
      step = aot.compile_train_step(exp, mesh, capacity_bytes=target.bytes_per_device)
      print("  " + step.report().replace("\n", "\n  "))
      print(f"  plan / compiler: {p.total / max(step.total_bytes, 1):.2f}")
  return 0


def _experiment(args, mesh=None):
  """The resolved Experiment of ``--experiment`` with this command's overrides (what aot compiles)."""
  from calm_jax.parallel import aot

  return aot.experiment(args.experiment, global_batch=args.global_batch, grad_accum=args.grad_accum,
                        remat=args.remat, seq_len=args.seq_len, mesh=mesh, dtype=args.dtype,
                        param_dtype=args.param_dtype)


def _topologies(args) -> int:
  """``--topology``: the plan and the step compiled for each TPU slice, the compiler's verdict."""
  from calm_jax.cost import recipes
  from calm_jax.parallel import aot, sharding

  mesh_arg = tuple(int(x) for x in (args.mesh or "1,-1,1").split(","))
  if len(mesh_arg) != 3:
    print("memory_plan: --mesh needs three sizes data,fsdp,tensor", file=sys.stderr)
    return 2
  try:
    exp = _experiment(args)
  except (KeyError, ValueError) as e:
    print(f"memory_plan: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  status = 0
  for topology in args.topology:
    print()
    try:
      chips = aot.tpu_topology_chips(topology)
      aot.tpu_chip(topology)
      mesh = sharding.mesh_shape(*mesh_arg, num_devices=chips)
      p = recipes.plan_for(exp, topology, mesh)
    except (ValueError, sharding.ShardingError) as e:
      print(f"memory_plan: {e}", file=sys.stderr)
      return 2
    print(f"experiment {args.experiment} on TPU {topology}: global batch {exp.train.global_batch_size} x "
          f"{exp.data.block_length} tokens, grad_accum {exp.optim.grad_accum_steps}")
    print("analytic plan:")
    # The compiler's verdict decides below; the plan's line is only its estimate.
    print("  " + p.report().replace("verdict:", "plan's estimate:").replace("\n", "\n  "))
    if not aot.have_libtpu():
      print("compiler check skipped: libtpu is not installed (pip install -e '.[tpu]'); the verdict is the "
            "plan's estimate above")
      status = status or (0 if p.fits else 1)
      continue
    step = aot.compile_for_tpu(exp, topology, mesh)
    print(step.report())
    if not step.error:
      print(f"plan / compiler total: {p.total / step.total_bytes:.2f}")
    status = status or (0 if step.fits else 1)
  return status


def _recipes(args) -> int:
  """``--recipes``: a compiled, fitting recipe per paper experiment, and the plan-vs-compiler table."""
  from calm_jax.cost import recipes
  from calm_jax.parallel import aot

  if not aot.have_libtpu() and not args.from_cache:
    print("memory_plan: --recipes compiles for TPU slices and needs libtpu (pip install -e '.[tpu]')",
          file=sys.stderr)
    return 2
  cache = recipes.load_cache()
  if args.from_cache:   # no compiles: the recorded recipes and every recorded compile
    found = {name: recipes.recorded_recipe(name, cache) for name in recipes.PAPER_EXPERIMENTS}
    compare = sorted((recipes.refresh_plan(r) for r in cache.values()),
                     key=lambda r: (list(recipes.PAPER_EXPERIMENTS).index(r["experiment"])
                                    if r["experiment"] in recipes.PAPER_EXPERIMENTS else 99,
                                    r["topology"], r["grad_accum"]))
    return _write(args, recipes.docs_section(found, compare))
  if args.force:
    cache = {}
  topology = (args.topology or [recipes.RECIPE_TOPOLOGY])[0]
  names = [args.experiment] if args.experiment else list(recipes.PAPER_EXPERIMENTS)
  found = {}
  for name in names:
    print(f"{name}: searching on {topology}", flush=True)
    found[name] = recipes.find_recipe(name, topology, cache)
  compare = []
  for name, rec in found.items():
    if rec is None:
      continue
    for topo in recipes.COMPARE_TOPOLOGIES:
      chips = aot.tpu_topology_chips(topo)
      setting = recipes.Setting(name, topo, (1, chips, 1), _accum_for(rec, chips), rec["remat"])
      compare.append(recipes.evaluate(setting, cache))
      recipes.save_cache(cache)
  return _write(args, recipes.docs_section(found, compare))


def _write(args, text: str) -> int:
  from calm_jax.cost import recipes

  print(text)
  if args.write_docs:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "SHARDING.md")
    recipes.write_docs(text, path)
    print(f"wrote {path}")
  return 0


def _accum_for(rec, chips: int) -> int:
  """The recipe's micro-batch per chip kept on a slice of ``chips`` (at least 1 row)."""
  micro_rows = rec["global_batch"] // (rec["chips"] * rec["grad_accum"])
  per_chip = rec["global_batch"] // chips
  accum = max(1, per_chip // max(micro_rows, 1))
  while per_chip % accum:
    accum -= 1
  return accum


if __name__ == "__main__":
  sys.exit(main())
