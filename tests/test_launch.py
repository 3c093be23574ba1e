"""The training command line: overrides are applied, and bad input ends in one line naming the culprit.

Each case runs ``python -m launch.train`` in a subprocess and stops before any
compilation (the config or the data check fails first), so these are quick.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, *args):
  cmd = [sys.executable, "-m", "launch.train", f"--workdir={tmp_path / 'run'}", *args]
  return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    # An override that parses is applied: the validator then sees the new value.
    (["--config=experiments/transformer.py:tiny", "--config.train.steps=0"],
     "error: train.steps: must be >= 1, got 0"),
    (["--config=experiments/autoencoder.py:tiny", "--config.train.stepz=5"],
     'error: --config.train.stepz: no such config field; Did you mean "steps"'),
    (["--config=experiments/autoencoder.py:tiny", "--config.trainx.steps=5"],
     "error: --config.trainx.steps: no such config field"),
    (["--config=experiments/autoencoder.py:tiny", "--config.train.steps=abc"],
     "error: flag --config.train.steps=abc:"),
    (["--config=experiments/transformer.py:tiny", "--config.model.backbone.num_attention_heads=3"],
     "error: model.backbone"),
    (["--config=experiments/calm.py:tiny", "--config.ae_workdir=/nonexistent/ae"],
     "error: ae_workdir: /nonexistent/ae"),
    (["--config=experiments/transformer.py:tiny", "--config.data.auto_prepare=False",
      "--config.data.dir=/nonexistent/data"], "error: data.dir: /nonexistent/data"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, args, expected):
  r = _train(tmp_path, *args)
  assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(expected), r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not os.path.isdir(tmp_path / "run" / "checkpoints")   # nothing started
