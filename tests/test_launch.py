"""The commands as ``python -m launch.<name>`` runs them: --help, and a bad input ending in one line.

The table of bad inputs (tests/test_bad_inputs.py) calls each command's ``main`` in-process; these few
subprocesses check the real entry points around it (the interpreter, the re-exec of hostmem, stderr).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "prepare", "evaluate", "generate", "convert", "list_experiments", "sweep", "frontier")


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], check=False, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", COMMANDS)
def test_help(module):
  r = _run(module, "--help")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--[no]verbose:" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("module, args, expected", [
    ("train", ["--config=experiments/transformer.py:tiny", "--config.train.steps=0", "--workdir={tmp}/run"],
     "error: train.steps: must be >= 1, got 0"),
    ("train", ["--config=experiments/autoencoder.py:tiny", "--config.train.stepz=5", "--workdir={tmp}/run"],
     'error: --config.train.stepz: no such config field; Did you mean "steps"'),
    ("prepare", ["--source={tmp}/missing.txt", "--mode=lm", "--block_length=16", "--out_dir={tmp}/out"],
     "error: {tmp}/missing.txt: no such file"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, module, args, expected):
  r = _run(module, *(a.format(tmp=tmp_path) for a in args))
  assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
  assert r.stderr.strip().splitlines() == [expected.format(tmp=tmp_path)] or \
      r.stderr.strip().startswith(expected.format(tmp=tmp_path)), r.stderr[-2000:]
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
  assert not os.listdir(tmp_path)   # nothing written
