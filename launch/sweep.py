"""Runs a sweep of the registry one run after the other, then renders its frontier.

  python -m launch.sweep --sweep=frontier_tiny --root=runs/frontier_tiny
  python -m launch.sweep --sweep=frontier_tiny --root=/tmp/ft --steps_scale=0.25   # a quicker, rougher plot

Each run trains in ``ROOT/<name>`` with ``calm_jax.training.train.run`` (so a sweep that
is started again resumes its unfinished run and skips the finished ones, whose
last checkpoint is at ``train.steps``), in the sweep's order: autoencoders
before the CALM runs that read them.  Then ``calm_jax.evaluation.frontier`` plots BrierLM
against training FLOPs into ``ROOT/frontier.png`` and ``.svg``.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads
from launch import cli


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", "frontier_tiny", "A sweep name of experiments/registry.py.", flag_values=fv)
  flags.DEFINE_string("root", None, "Parent directory of the sweep's workdirs.", required=True,
                      flag_values=fv)
  flags.DEFINE_float("steps_scale", 1.0, "Multiply every run's train.steps (and cadences).", flag_values=fv)
  flags.DEFINE_list("only", [], "Run only these names of the sweep (others must exist already).",
                    flag_values=fv)


def scale_steps(config, scale: float) -> None:
  """train.steps x scale (at least 1); evaluation and checkpoint cadences follow."""
  t = config.train
  steps = max(1, round(t.steps * scale))
  t.eval_every = max(1, min(t.eval_every, round(t.eval_every * scale)))
  t.checkpoint_every = max(1, min(t.checkpoint_every, round(t.checkpoint_every * scale)))
  t.steps = steps


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.sweep``; exit statuses as ``launch.train`` (0, 2, 3, 75)."""
  fv = cli.parse(_define, argv, __doc__, "launch.sweep")
  from calm_jax.evaluation import frontier  # pylint: disable=import-outside-toplevel
  from calm_jax.training import metrics, train  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel

  if fv.steps_scale <= 0:
    cli.fail(f"--steps_scale: must be > 0, got {fv.steps_scale}")
  root = os.path.abspath(fv.root)
  try:
    runs = registry.get_sweep(fv.sweep, root=root)
  except KeyError as e:
    cli.fail(f"--sweep: {e.args[0]}")
  names = [n for n, _ in runs]
  unknown = [n for n in fv.only if n not in names]
  if unknown:
    cli.fail(f"--only: {unknown[0]!r} is not a run of {fv.sweep} (runs: {', '.join(names)})")
  t0 = time.perf_counter()
  for i, (name, config) in enumerate(runs):
    if fv.only and name not in fv.only:
      continue
    with config.unlocked():
      scale_steps(config, fv.steps_scale)
    print(f"== [{i + 1}/{len(runs)}] {name} ({config.kind}, {config.train.steps} steps) -> {root}/{name}",
          flush=True)
    try:
      train.run(config, os.path.join(root, name))
    except train.ConfigError as e:
      cli.fail(f"{name}: {e}")
    except metrics.NonFiniteError as e:
      cli.fail(f"{name}: {e}", cli.EXIT_NONFINITE)
    except train.Preempted as e:
      print(f"{name}: {e}; resume with the same command", file=sys.stderr, flush=True)
      raise SystemExit(cli.EXIT_PREEMPTED) from None
  workdirs = [os.path.join(root, n) for n in names]
  loaded = frontier.load_runs([w for w in workdirs if os.path.isdir(w)])
  print(frontier.format_runs(loaded))
  for path in frontier.plot(loaded, os.path.join(root, "frontier")):
    print("wrote", path)
  print(f"sweep done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  main()
