"""Renders the BrierLM-vs-training-FLOPs frontier (PNG and SVG) from finished runs.

  python -m launch.frontier --root=/tmp/frontier_tiny                 # every run under the sweep root
  python -m launch.frontier --workdirs=/runs/calm_k1,/runs/tf_s --out=/tmp/frontier
  python -m launch.frontier --runs_json=docs/frontier_tiny.json --out=docs/frontier_tiny   # redraw

Reads each workdir's config.json, metrics.jsonl and eval JSON
(``calm_jax.evaluation.frontier``); prints the table of runs and writes OUT.png, OUT.svg and
OUT.json (the runs, from which --runs_json redraws the figure without the workdirs).
BrierLM is 0 for runs at chance (a Brier-n <= 0), drawn as hollow markers.
"""

from __future__ import annotations

import os

from absl import flags

from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_string("root", None, "Sweep root: every workdir below it is read.", **d)
  flags.DEFINE_list("workdirs", [], "Explicit workdirs (instead of, or with, --root).", **d)
  flags.DEFINE_string("out", None, "Output prefix (default: ROOT/frontier or ./frontier).", **d)
  flags.DEFINE_bool("exclude_ae", False, "Do not charge CALM runs with their autoencoder's training.", **d)
  flags.DEFINE_string("title", "Quality vs training compute", "Plot title.", **d)
  flags.DEFINE_string("runs_json", None, "Redraw from a runs JSON written by an earlier call.", **d)


def main(argv: list[str] | None = None) -> None:
  fv = cli.parse(_define, argv, __doc__, "launch.frontier")
  from calm_jax.evaluation import frontier  # pylint: disable=import-outside-toplevel
  workdirs = list(fv.workdirs)
  with cli.errors(getattr(frontier, "FrontierError", ValueError)):
    if fv.root:
      workdirs += frontier.find_workdirs(cli.check_dir_arg("root", fv.root))
    if not workdirs and not fv.runs_json:
      raise cli.UsageError("--root: give --root, --workdirs or --runs_json")
    runs = frontier.load_runs_json(fv.runs_json) if fv.runs_json else []
    if workdirs:
      runs += frontier.load_runs(workdirs, include_ae=not fv.exclude_ae)
  print(frontier.format_runs(runs))
  out = fv.out or os.path.join(fv.root or ".", "frontier")
  for p in frontier.plot(runs, out, fv.title):
    print("wrote", p)
  if not fv.runs_json or workdirs:
    print("wrote", frontier.save_runs(runs, out + ".json"))


if __name__ == "__main__":
  main()
