"""A run SIGKILLed twice mid-way and started again ends bit-identical to an uninterrupted run (CPU),
and its metrics.jsonl holds the uninterrupted run's rows, each step once (timing fields aside)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from calm_jax.training import metrics, train
    from experiments import registry
    workdir, kill_at = sys.argv[1], int(sys.argv[2])
    if kill_at >= 0:
      real = metrics.ProgressBar.update
      def update(self, step, tokens, **kw):
        if step == kill_at:          # step kill_at has run; the checkpoint before it may be mid-save
          os.kill(os.getpid(), signal.SIGKILL)
        real(self, step, tokens, **kw)
      metrics.ProgressBar.update = update
    c = registry.get_config("transformer_tiny")
    with c.unlocked():
      c.model.backbone.num_hidden_layers = 1
      c.train.update(steps=10, global_batch_size=4, eval_batch_size=4, eval_batches=1, log_every=1,
                     eval_every=1000, checkpoint_every=3)
      c.eval.brier = False   # the final eval's BrierLM programs would triple each run's compile time
    train.run(c, workdir)
    """)


def _run(workdir, kill_at):
  return subprocess.run([sys.executable, "-c", SCRIPT, workdir, str(kill_at)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def _final_params(workdir):
  import jax

  from calm_jax.training import checkpoint
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps[-1] == 10
  path = os.path.join(workdir, "checkpoints", "10")
  restored = checkpoint.restore_params(path, _abstract(path))
  return jax.tree.leaves(restored)


def _abstract(path):
  from calm_jax import models
  from calm_jax.training import train
  from experiments import registry
  c = registry.get_config("transformer_tiny")
  with c.unlocked():
    c.model.backbone.num_hidden_layers = 1
  return models.abstract_params(train.resolve(c).model)


def _rows(workdir):
  """metrics.jsonl without its timing fields (perf/*: seconds, tokens/s, MFU)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in f]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  r = _run(straight, -1)
  assert r.returncode == 0, r.stderr[-2000:]
  for kill_at in (4, 8):   # after steps 5 and 9 ran; checkpoints at 3, 6, 9
    r = _run(killed, kill_at)
    assert r.returncode == -9, r.stderr[-2000:]          # really killed, mid-run
  assert not os.path.isdir(os.path.join(killed, "checkpoints", "10"))
  assert len(_rows(killed)) > 5                          # what the killed runs logged reached the file
  r = _run(killed, -1)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout
  a, b = _final_params(straight), _final_params(killed)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = _rows(straight)
  assert [r["step"] for r in rows] == [*range(1, 11), 10]   # 10 train rows and the final eval
  assert _rows(killed) == rows
