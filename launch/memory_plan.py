"""Per-device memory plan of a training run on a target; optionally the compiled step's analysis.

  # The acceptance verdicts: CALM-XL on 8 x 80 GB GPUs and on a TPU v5p-32, FSDP.
  python -m launch.memory_plan --experiment=calm_xl --target=gpu8x80 --target=v5p-32

  # Any experiment / paper config on any target, with overrides:
  python -m launch.memory_plan --experiment=transformer_l --devices=4 --memory_gb=40 \\
      --mesh=1,2,2 --global_batch=64 --seq_len=2048 --remat=full --grad_accum=2

  # Small models: also compile the real sharded step on fake CPU devices.
  python -m launch.memory_plan --experiment=calm_tiny --devices=8 --memory_gb=16 --mesh=2,2,2 --compile

``--experiment`` takes a name of ``experiments/registry.py`` (its model,
global batch, block length, remat policy and grad accumulation are the
defaults) or, when the registry is unavailable, a ``calm_jax.cost.flops.paper_configs()``
name.  The numbers are explained in :mod:`calm_jax.cost.memory`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experiment", required=True)
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
      mesh = sharding.make_mesh(*target.resolved_mesh())
      stats = memory.compiled_memory(model.kind, model.cfg, mesh, p.workload, model.ae_cfg, model.rules)
      print("  " + memory.describe_compiled(stats))
  return 0


if __name__ == "__main__":
  sys.exit(main())
