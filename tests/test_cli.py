"""The evaluation and generation commands end to end, on a converted tiny CALM.

A random tiny CALM (K = 4) and its autoencoder are exported in the reference's
Hugging Face layout with a word-level tokenizer beside them, so the commands
load them as a user's converted checkpoint.  Each case runs the command in a
subprocess with 2 CPU devices (the device count must be set before JAX starts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sharded.common import random_params, tiny_configs  # tests/ is on sys.path under pytest
from test_data_pipeline import _word_tokenizer

from calm_jax import interop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 63   # ids 0..62; PAD gets 63: the tiny configs' vocabulary of 64


def _run(module: str, *args):
  # PJRT_NPROC: spare XLA:CPU workers for the two devices' collectives (tests/sharded/common.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PJRT_NPROC=os.environ.get("PJRT_NPROC", "8"),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=600, check=False)


@pytest.fixture(scope="module")
def calm_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  tok = _word_tokenizer(str(root), WORDS)
  assert tok.pad_id == WORDS
  ae_cfg, cfg, _ = tiny_configs()
  folder = str(root / "calm")
  interop.export_energy(folder, cfg, random_params(cfg, 1), ae_cfg, random_params(ae_cfg, 0),
                        pad_token_id=tok.pad_id, eos_token_id=0)
  for name in ("tokenizer.json", "special_tokens_map.json"):
    shutil.copy(root / name, os.path.join(folder, name))
  rng = np.random.default_rng(0)
  text = root / "valid.txt"
  text.write_text("\n\n".join(" ".join(f"w{i}" for i in rng.integers(1, WORDS, 40)) for _ in range(6)) + "\n")
  return folder, str(text), root


def test_evaluate_command_sharded_equals_one_device(calm_folder):
  folder, text, root = calm_folder
  results = {}
  for devices in (1, 2):
    out = root / f"brier_{devices}.json"
    r = _run("launch.evaluate", f"--workdir={folder}", f"--data={text}", "--block_length=16", "--batch_size=3",
             f"--devices={devices}", f"--output={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "BrierLM" in r.stdout and f"wrote {out}" in r.stdout
    results[devices] = json.loads(out.read_text())
  one, two = results[1], results[2]
  assert one["block_length"] == 16 and one["num_rows"] >= 6 and one["num_positions"] == 3 * one["num_rows"]
  # CALM K = 4 draws its noise per row: the 2-device run (3 blocks a batch, padded to 4) is the same.
  for name in ("brier1", "brier2", "brier3", "brier4", "brierlm", "num_rows", "num_positions"):
    assert two[name] == pytest.approx(one[name], abs=1e-9), name


def test_generate_command_prints_continuations(calm_folder):
  folder, _, _ = calm_folder
  r = _run("launch.generate", f"--workdir={folder}", "--prompt=w1 w2 w3", "--prompt=w4 w5 w6 w7 w8",
           "--max_new_tokens=8", "--temperature=0.5", "--num_candidates=16")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "=== 1: w1 w2 w3" in r.stdout and "=== 2: w4 w5 w6 w7 w8" in r.stdout
  assert "tokens/s" in r.stderr


def test_generate_command_refuses_a_bad_temperature(calm_folder):
  folder, _, _ = calm_folder
  r = _run("launch.generate", f"--workdir={folder}", "--prompt=w1", "--temperature=0.3", "--method=batch")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "0.3" in last and "Traceback" not in r.stderr
