"""BrierLM of one trained CALM against its head's number of sampling steps, and Fig. 9's plot.

  # A flow-head model, both solvers, on a prepared validation split:
  python -m launch.head_steps --workdir=/runs/abl_flow --data=/data/pile_lm_8192 \\
      --steps=1,2,4,8,16,32,64,100 --solvers=midpoint,euler --num_blocks=256

  # Redraw Fig. 9 from the JSON results of several models (energy, flow, diffusion):
  python -m launch.head_steps --output=/runs/fig9 --plot=/runs/abl_energy/eval/head_steps.json,\\
      /runs/abl_flow/eval/head_steps.json,/runs/abl_diffusion/eval/head_steps.json

The model is evaluated as ``launch.evaluate`` does (teacher-forced two-sample
BrierLM, the same key for every step count), once per step count with the
head's ``with_sampling_steps`` (diffusion: respaced DDPM steps, >= 2; flow:
solver steps, each 2 network calls for midpoint).  A one-step head (energy) is
evaluated once.  Writes ``<output>/head_steps.json`` (default output:
``<workdir>/eval``) and ``head_steps.png``.  --data must be a prepared
directory (``python -m launch.prepare``).
"""

from __future__ import annotations

import json
import os

from absl import flags

from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_string("workdir", None, "Training workdir or converted HF folder of a CALM model.", **d)
  flags.DEFINE_string("data", None, "Prepared data directory (manifest.json).", **d)
  flags.DEFINE_string("split", "valid", "Split of the prepared directory.", **d)
  flags.DEFINE_list("steps", ["1", "2", "4", "8", "16", "32", "64", "100"], "Sampler step counts.", **d)
  flags.DEFINE_list("solvers", ["midpoint", "euler"], "Flow head: the ODE solvers to evaluate.", **d)
  flags.DEFINE_integer("batch_size", 8, "Blocks per batch.", **d)
  flags.DEFINE_integer("num_blocks", 0, "Evaluate at most this many blocks (0: all).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", **d)
  flags.DEFINE_integer("seed", 0, "PRNG seed (the same for every step count).", **d)
  flags.DEFINE_string("output", None, "Output directory (default: <workdir>/eval).", **d)
  flags.DEFINE_list("plot", [], "Only draw the plot from these head_steps.json files.", **d)


def step_configs(cfg, steps: list[int], solvers: list[str]) -> list[tuple[str, int, object]]:
  """``(label, steps, cfg)`` for every point of the sweep.  A one-step head (energy) gives one point;
  step counts a head refuses (diffusion needs >= 2) are skipped; ``solvers`` apply to the flow head."""
  from calm_jax.configs import FLOW_SOLVERS, ConfigError  # pylint: disable=import-outside-toplevel
  from calm_jax.models import heads  # pylint: disable=import-outside-toplevel
  out = []
  for solver in (solvers if cfg.head == "flow" else [""]):
    if cfg.head == "flow" and solver not in FLOW_SOLVERS:
      raise ValueError(f"--solvers: unknown flow solver {solver!r} (known: {', '.join(FLOW_SOLVERS)})")
    base = cfg.replace(flow_solver=solver) if solver else cfg
    label = f"{cfg.head}_{solver}" if solver else cfg.head
    for n in steps:
      try:
        out.append((label, n, heads.get(base).with_sampling_steps(n)))
      except ConfigError:
        continue   # e.g. one diffusion step: the respaced process has no posterior variance
      except ValueError:
        return [(cfg.head, 1, cfg)]   # a head without a step count
  return out


def run_sweep(trained, data_dir: str, split: str, steps: list[int], solvers: list[str], key,
              batch_size: int = 8,
              num_blocks: int = 0) -> list[dict]:
  """One curve per label: ``{'label', 'head', 'points': [{'steps', 'network_calls', 'brierlm', ...}]}``."""
  from calm_jax import data  # pylint: disable=import-outside-toplevel
  from calm_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  from calm_jax.models import heads  # pylint: disable=import-outside-toplevel
  if trained.kind != "energy":
    raise ValueError(f"head_steps needs a CALM model, got kind={trained.kind!r}")
  num_batches = -(-num_blocks // batch_size) if num_blocks else None
  curves: dict[str, dict] = {}
  for label, n, cfg in step_configs(trained.cfg, steps, solvers):
    batches = data.make_eval_iterator(data_dir, split, global_batch_size=batch_size)
    r = evaluate.evaluate_brier("energy", cfg, trained.params, batches, key, ae_cfg=trained.ae_cfg,
                                ae_params=trained.ae_params, num_batches=num_batches, progress=False)
    point = {"steps": n, "network_calls": heads.get(cfg).network_calls, "brierlm": r["brierlm"],
             "brierlm_se": r.get("brierlm_se", 0.0), "num_positions": r.get("num_positions")}
    print(f"{label:<20} steps {n:>4}  calls {point['network_calls']:>4}  BrierLM {100 * r['brierlm']:.3f}",
          flush=True)
    curves.setdefault(label, {"label": label, "head": cfg.head, "points": []})["points"].append(point)
  return list(curves.values())


def main(argv=None):
  fv = cli.parse(_define, argv, __doc__, "launch.head_steps")
  from calm_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  if fv.plot:
    curves = []
    for p in fv.plot:
      with open(p) as f:
        curves += json.load(f)["curves"]
    out = fv.output or os.path.dirname(os.path.abspath(fv.plot[0]))
    print("plot:", plots.plot_head_steps(curves, os.path.join(out, "head_steps.png")))
    return
  if not fv.workdir or not fv.data:
    cli.fail("--workdir: --workdir and --data are required (or --plot)")
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  try:
    trained = loading.load_trained(fv.workdir, fv.step)
    curves = run_sweep(trained, fv.data, fv.split, [int(s) for s in fv.steps], fv.solvers,
                       jax.random.key(fv.seed), fv.batch_size, fv.num_blocks)
  except (loading.LoadError, DataError, ValueError) as e:
    cli.fail(e)
  out = fv.output or os.path.join(fv.workdir, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "head_steps.json"), "w") as f:
    json.dump({"workdir": os.path.abspath(fv.workdir), "data": fv.data, "seed": fv.seed,
               "curves": curves}, f, indent=2)
  print("wrote", os.path.join(out, "head_steps.json"))
  print("plot:", plots.plot_head_steps(curves, os.path.join(out, "head_steps.png")))


if __name__ == "__main__":
  main()
