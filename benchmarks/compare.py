"""calm_jax vs the reference train steps, interleaved on the same machine; medians and ratios.

  CALM_REFERENCE_DIR=/work/ref python benchmarks/compare.py --sizes=small,medium --rounds=3 \\
      --ref_python=/work/refvenv/bin/python [--dtype=bfloat16] [--json=out.jsonl]

Starts benchmarks/train_step.py and benchmarks/reference_train_step.py as
long-lived workers (``--serve``: each compiles/builds once) and alternates
requests between them, model by model, ``rounds`` times, so that both see the
same background load.  Prints the medians over rounds of tokens/s, MFU (each
against its own framework's matmul peak in that dtype) and the ratio
calm_jax / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_configs as bc  # noqa: E402
import machine  # noqa: E402


def _worker(python, script, env=None):
  return subprocess.Popen([python, os.path.join(HERE, script), "--serve"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE), env=env)


def _ask(proc, req):
  proc.stdin.write(json.dumps(req) + "\n")
  proc.stdin.flush()
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f"benchmark worker {proc.args} died on {req}")
  return json.loads(line)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="small,medium")
  ap.add_argument("--models", default=",".join(bc.MODELS))
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--ref_python", default=os.environ.get("CALM_REFERENCE_PYTHON", "/work/refvenv/bin/python"))
  ap.add_argument("--json", default=None, help="append every measurement as a JSON line")
  ap.add_argument("--reference_malloc", default="system", choices=("system", "tuned"),
                  help="glibc malloc of the reference worker: its defaults (as the reference runs), or "
                       "the settings calm_jax's entry points use (calm_jax.hostmem)")
  args = ap.parse_args()
  print(f"# {machine.describe()} (before)", flush=True)
  ref_env = None
  if args.reference_malloc == "tuned":
    from calm_jax import hostmem  # pylint: disable=import-outside-toplevel
    ref_env = hostmem.tuned_environ()
  jx = _worker(sys.executable, "train_step.py")
  ref = _worker(args.ref_python, "reference_train_step.py", env=ref_env)
  results = []
  try:
    for r in range(args.rounds):
      for size in args.sizes.split(","):
        for model in args.models.split(","):
          req = dict(model=model, size=size, dtype=args.dtype, iters=args.iters)
          pair = (_ask(jx, req), _ask(ref, req)) if r % 2 == 0 else tuple(reversed((_ask(ref, req), _ask(jx, req))))
          for res in pair:
            res["round"] = r
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "times"}), file=sys.stderr, flush=True)
  finally:
    for p in (jx, ref):
      p.stdin.close()
      p.wait()
  if args.json:
    with open(args.json, "a") as f:
      f.writelines(json.dumps(x) + "\n" for x in results)
  print(f"# {machine.describe()} (after)")
  print(f"# reference malloc: {args.reference_malloc}; 'best' = the fastest single step of all rounds "
        "(the least disturbed by a busy host)")
  print("| model | size | dtype | calm_jax step (s) | calm_jax tok/s | calm_jax MFU | reference step (s) "
        "| reference tok/s | ratio | best steps (s) | best ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")
  for size in args.sizes.split(","):
    for model in args.models.split(","):
      med = {}
      for impl in ("calm_jax", "reference"):
        rs = [x for x in results if x["impl"] == impl and x["model"] == model and x["size"] == size]
        med[impl] = {k: statistics.median(x[k] for x in rs) for k in ("step_s", "tokens_per_s")}
        med[impl]["best"] = min(t for x in rs for t in x["times"])
        if impl == "calm_jax":
          med[impl]["mfu"] = statistics.median(x["mfu"] for x in rs)
      j, f = med["calm_jax"], med["reference"]
      print(f"| {model} | {size} | {args.dtype} | {j['step_s']:.3f} | {j['tokens_per_s']:.0f} | {j['mfu']:.1%} "
            f"| {f['step_s']:.3f} | {f['tokens_per_s']:.0f} | {j['tokens_per_s'] / f['tokens_per_s']:.2f}x "
            f"| {j['best']:.3f} / {f['best']:.3f} | {f['best'] / j['best']:.2f}x |")


if __name__ == "__main__":
  main()
