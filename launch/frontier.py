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

from absl import app, flags

from calm_jax.evaluation import frontier

_ROOT = flags.DEFINE_string("root", None, "Sweep root: every workdir below it is read.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Explicit workdirs (instead of, or with, --root).")
_OUT = flags.DEFINE_string("out", None, "Output prefix (default: ROOT/frontier or ./frontier).")
_NO_AE = flags.DEFINE_bool("exclude_ae", False, "Do not charge CALM runs with their autoencoder's training.")
_TITLE = flags.DEFINE_string("title", "Quality vs training compute", "Plot title.")
_RUNS_JSON = flags.DEFINE_string("runs_json", None, "Redraw from a runs JSON written by an earlier call.")


def main(argv):
  del argv
  workdirs = list(_WORKDIRS.value)
  if _ROOT.value:
    workdirs += frontier.find_workdirs(_ROOT.value)
  if not workdirs and not _RUNS_JSON.value:
    raise app.UsageError("give --root, --workdirs or --runs_json")
  runs = frontier.load_runs_json(_RUNS_JSON.value) if _RUNS_JSON.value else []
  if workdirs:
    runs += frontier.load_runs(workdirs, include_ae=not _NO_AE.value)
  print(frontier.format_runs(runs))
  out = _OUT.value or os.path.join(_ROOT.value or ".", "frontier")
  for p in frontier.plot(runs, out, _TITLE.value):
    print("wrote", p)
  if not _RUNS_JSON.value or workdirs:
    print("wrote", frontier.save_runs(runs, out + ".json"))


if __name__ == "__main__":
  app.run(main)
