"""Two OS processes on localhost (jax.distributed, gloo CPU collectives) train a few steps and
match one process with the same global batch and mesh (tests/sharded/multihost.py).

Covered on the way: ``jax.distributed`` initialised from the environment as the
launch scripts do, the grain pipeline's per-process slice, global batches from
``jax.make_array_from_process_local_data``, metrics written by process 0 only,
and an orbax save and restore (state + each process's iterator position) in
which both processes take part.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_data_pipeline import _word_tokenizer  # tests/ is on sys.path under pytest

from calm_jax import data
from calm_jax.data import sources

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sharded", "multihost.py")
T, NUM_BLOCKS, WORDS = 16, 64, 60   # ids stay below the tiny model's vocabulary of 64


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _prepare(root) -> str:
  """NUM_BLOCKS random blocks of T tokens under a WordLevel tokenizer (no tokenizer training)."""
  tok = _word_tokenizer(root, WORDS)
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, WORDS, T, dtype=np.int32) for _ in range(NUM_BLOCKS)]
  out = os.path.join(root, "blocks")
  data.prepare(sources.ListSource(docs), out, tok, T, 4, "lm", append_eos=False,
               valid_source_spec=sources.ListSource(docs[:8]), progress=False)
  return out


def _spawn(*args):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS", "SLURM_NTASKS",
            "CALM_DISTRIBUTED"):
    env.pop(k, None)
  return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=os.path.dirname(SCRIPT))


def _result(out: str) -> dict:
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert lines, out[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_two_processes_match_one(tmp_path):
  blocks = _prepare(str(tmp_path))
  port = str(_free_port())
  multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
  procs = [_spawn("multi", blocks, str(multi_dir), port, str(rank)) for rank in (0, 1)]
  procs.append(_spawn("single", blocks, str(single_dir)))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-6000:]
  multi, single = _result(outs[0]), _result(outs[2])
  assert "RESULT " not in outs[1]   # only process 0 reports
  assert len(multi["losses"]) == 3
  # Same global batch (rows in another order: host p reads rows p, p+2, ...; the loss is a mean).
  assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5)
  assert multi["param_sum"] == pytest.approx(single["param_sum"], rel=1e-5)
  assert multi["losses"][-1] < multi["losses"][0]  # it trained
  # Restored state + iterator positions (saved by both processes) redo step 3 exactly.
  assert multi["redo_loss"] == pytest.approx(multi["losses"][2], rel=1e-6)
  assert single["redo_loss"] == pytest.approx(single["losses"][2], rel=1e-6)
  # BrierLM over both processes' held-out rows: all 8 blocks x 12 positions counted once; Brier-1
  # (no sampling in the 'lowvar' form) equals the single process's, Brier-2..4 are valid draws.
  assert multi["brier"]["num_rows"] == single["brier"]["num_rows"] == 8
  assert multi["brier"]["num_positions"] == 8 * (T - 4)
  assert multi["brier"]["brier1"] == pytest.approx(single["brier"]["brier1"], rel=1e-5)
  assert all(-1.0 <= multi["brier"][f"brier{n}"] <= 2.0 for n in (2, 3, 4))
  # Process 0 alone wrote the metrics: one row per step, not two.
  rows = [json.loads(line) for line in (multi_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
