"""Trains any stage: the autoencoder, CALM on a frozen autoencoder, or the baseline.

  # Tiny runs on a CPU (the embedded corpus is prepared on first use):
  python -m launch.train --config=experiments/autoencoder.py:tiny --workdir=runs/ae_tiny
  python -m launch.train --config=experiments/calm.py:tiny --workdir=runs/calm_tiny \\
      --config.ae_workdir=runs/ae_tiny
  python -m launch.train --config=experiments/transformer.py:tiny --workdir=runs/tf_tiny

  # Any field can be overridden; a typo is an error naming it:
  python -m launch.train --config=experiments/calm.py:size=M,K=4 --config.model.backbone.dtype=float32 ...

Start it again with the same --workdir to resume (after a kill, a preemption or
a NaN stop).  On several processes (a TPU pod, a SLURM job: launch/tpu_pod.sh,
launch/slurm.sh) ``jax.distributed`` is initialised from the environment first.

The model's vocabulary follows the data's tokenizer (``data.dir``'s manifest,
else ``data.tokenizer``, else ``data.vocab_size``) unless
``--config.model.vocab_size`` / ``--config.model.backbone.vocab_size`` is given;
a mismatch that remains names both values.

A workdir holding another kind of run, another model or anything but a calm_jax
run is refused before anything is written.

Exit status: 0 done; 2 bad input (one line, ``error: <field or path>: <what is
wrong>``: a config value, the workdir, missing data, an unreadable checkpoint);
3 a non-finite loss or gradient (one line naming the step, as ``metrics.jsonl``
and the checkpoints number it, and the last finite checkpoint; nothing
non-finite is saved, and a restart resumes from that checkpoint); 75 preempted
(SIGTERM: the step was saved; one line says how to resume); 1 a bug (traceback).
``--verbose`` shows the INFO logs of absl, orbax and JAX.
"""

from __future__ import annotations

import shlex
import sys

from absl import flags
from ml_collections import config_flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads
from launch import cli


def _definer(argv: list[str]):
  def define(fv: flags.FlagValues) -> None:
    # sys_argv: config_flags reads the --config.* overrides from it (main may be called in-process).
    config_flags.DEFINE_config_file("config", None, "experiments/<family>.py:<arg>", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics).", flag_values=fv,
                        required=True)
  return define


def _overridden(argv: list[str]) -> list[str]:
  """Config fields given on the command line: ``--config.model.vocab_size=5`` -> 'model.vocab_size'."""
  return [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.train``; exits with the statuses of the module docstring."""
  argv = list(sys.argv if argv is None else argv)
  fv = cli.parse(_definer(argv), argv, __doc__, "launch.train")
  config = cli.config_value(fv)
  if config is None:
    cli.fail("--config: required (e.g. --config=experiments/autoencoder.py:tiny)")
  with cli.errors():
    cli.check_dir_arg("workdir", fv.workdir, must_exist=False)

  from calm_jax.parallel import sharding  # pylint: disable=import-outside-toplevel

  # Before anything touches a device.
  sharding.initialize_distributed()
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from calm_jax.training import checkpoint, metrics, train  # pylint: disable=import-outside-toplevel

  with cli.errors(train.ConfigError, DataError, checkpoint.CheckpointError, FileNotFoundError,
                  NotADirectoryError, PermissionError):
    note = train.follow_data_vocab(config, _overridden(argv))
    if note:
      print(f"[calm_jax] {note}", flush=True)
    try:
      train.run(config, fv.workdir)
    except metrics.NonFiniteError as e:
      cli.fail(f"{e}; lower optim.learning_rate (or fix the data) and run again to resume from that "
               "checkpoint", cli.EXIT_NONFINITE)
    except train.Preempted as e:
      again = " ".join(shlex.quote(a) for a in ["python", "-m", "launch.train", *argv[1:]])
      print(f"{e}; resume with: {again}", file=sys.stderr, flush=True)
      raise SystemExit(cli.EXIT_PREEMPTED) from None


def run(argv: list[str] | None = None) -> None:
  """Kept for callers of the earlier entry point: the same as :func:`main`."""
  main(argv)


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  main()
