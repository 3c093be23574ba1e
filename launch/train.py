"""Trains any stage: the autoencoder, CALM on a frozen autoencoder, or the baseline.

  # Tiny runs on a CPU (the embedded corpus is prepared on first use):
  python -m launch.train --config=experiments/autoencoder.py:tiny --workdir=runs/ae_tiny
  python -m launch.train --config=experiments/calm.py:tiny --workdir=runs/calm_tiny \\
      --config.ae_workdir=runs/ae_tiny
  python -m launch.train --config=experiments/transformer.py:tiny --workdir=runs/tf_tiny

  # Any field can be overridden; a typo is an error naming it:
  python -m launch.train --config=experiments/calm.py:size=M,K=4 --config.model.backbone.dtype=float32 ...

Start it again with the same --workdir to resume.  On several processes (a TPU
pod, a SLURM job: launch/tpu_pod.sh, launch/slurm.sh) ``jax.distributed`` is
initialised from the environment first.  Input problems (a bad config value, a
missing data directory, an unreadable checkpoint) end with one line,
``error: <field or path>: <what is wrong>``, and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<family>.py:<arg>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics).", required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from calm_jax.parallel import sharding  # pylint: disable=import-outside-toplevel

  # Before anything touches a device.
  sharding.initialize_distributed()
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from calm_jax.training import checkpoint, train  # pylint: disable=import-outside-toplevel

  if _CONFIG.value is None:
    sys.exit("error: --config: required (e.g. --config=experiments/autoencoder.py:tiny)")
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (train.ConfigError, DataError, checkpoint.CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _flag_error(e: Exception, args: list[str]) -> str:
  """One line naming the offending ``--config.*`` override where the message does not."""
  msg = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
  if isinstance(e, (AttributeError, KeyError)):
    for a in args:
      if a.startswith("--config."):
        path = a[2:].split("=", 1)[0]
        if any(f"{part}'" in msg or f"\"{part}\"" in msg for part in path.split(".")[1:]):
          hint = msg[msg.index("Did you mean"):] if "Did you mean" in msg else ""
          return f"--{path}: no such config field{'; ' + hint if hint else ''}"
  return msg


def run(argv: list[str] | None = None) -> None:
  # config_flags applies --config.x.y overrides while parsing and raises plain
  # AttributeError/KeyError/TypeError for an unknown field or a bad value, before
  # main runs: parse here first so that those also end as one line naming the field,
  # then hand the parsed argv to app.run (parsing twice would define the overrides twice).
  argv = list(sys.argv if argv is None else argv)
  try:
    remaining = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: {_flag_error(e, argv[1:])}", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=argv, flags_parser=lambda _: remaining)


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  run()
