"""The training command under faults: SIGTERM exits 75 saying how to resume; a NaN stops at once (exit 3),
naming the step and the last finite checkpoint, and no restart resumes from a non-finite state.

One tiny one-layer Transformer workdir, three runs of ``launch.train``'s ``main`` in this process (the
same program each time, compiled once), with a learning rate of 1e30: step 1 is finite (and saved), its
update makes the parameters ~1e30, so step 2's gradient is NaN.
"""

import json
import os
import signal

from calm_jax.training import metrics
from launch import train as train_cmd


def _main(argv, capfd):
  capfd.readouterr()
  try:
    train_cmd.main(argv)
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capfd.readouterr()
  return code, out, err.strip().splitlines()[-1] if err.strip() else ""


def _steps(workdir):
  ckpts = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return ckpts, [json.loads(line)["step"] for line in f]


def test_sigterm_then_nan_then_restart(tmp_path, capfd, monkeypatch):
  wd = str(tmp_path / "run")
  argv = ["launch.train", "--config=experiments/transformer.py:tiny", f"--workdir={wd}",
          "--config.model.backbone.num_hidden_layers=1", "--config.optim.learning_rate=1e30",
          "--config.train.steps=4", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=1",
          "--config.train.log_every=1", "--config.train.global_batch_size=4",
          "--config.train.eval_batch_size=4", "--config.train.eval_batches=1", "--config.eval.brier=False"]

  # 1. SIGTERM while step 1 runs: step 1 is saved, exit status 75, one line saying how to resume.
  real = metrics.ProgressBar.update

  def update(self, step, tokens, **kw):
    if step == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    real(self, step, tokens, **kw)

  monkeypatch.setattr(metrics.ProgressBar, "update", update)
  code, _, last = _main(argv, capfd)
  monkeypatch.undo()
  assert code == 75, last
  assert last.startswith(f"preempted (SIGTERM) at step 1: saved {wd}/checkpoints/1; resume with: python -m "
                         "launch.train --config=experiments/transformer.py:tiny"), last
  assert _steps(wd) == ([1], [1])

  # 2. Resumed: step 2 is NaN. One line names step 2 (as metrics.jsonl and checkpoints count) and the last
  #    finite checkpoint; nothing of step 2 is saved or logged.
  code, out, last = _main(argv, capfd)
  assert code == 3, last
  assert f"resumed from {wd}/checkpoints/1 at step 1" in out
  assert last.startswith("error: non-finite metrics at step 2: train/"), last   # the gradient (and the loss)
  assert f"(last finite checkpoint: step 1 in {wd}/checkpoints; nothing non-finite was saved)" in last, last
  assert _steps(wd) == ([1], [1])

  # 3. Every restart resumes from the finite checkpoint again and keep_checkpoints=1 keeps it.
  code, out, last2 = _main(argv, capfd)
  assert code == 3 and last2 == last and f"resumed from {wd}/checkpoints/1 at step 1" in out
  assert _steps(wd) == ([1], [1])
  assert not os.path.exists(f"{wd}/checkpoints.nonfinite")   # nothing non-finite ever reached the disk
