"""Sharding on simulated devices: parity of every model kind across meshes, restore onto
another mesh, the rules table and the memory plan.

The multi-device checks run in their own processes (tests/sharded/parity.py, two
side by side) because the CPU device count must be set before JAX starts; this
process keeps its one device.  Tolerance policy: fp32 differences of reductions
in another order (1e-5 relative to the gradients' scale), never loosened to make
a test pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax.cost import memory
from calm_jax.parallel import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KINDS = ("autoencoder", "energy", "transformer")
MESHES = ["8x1x1", "1x8x1", "2x2x2"]
# Two helper processes side by side (XLA compiles on one core each), about equally long; the
# second also does the restore round trip, which reuses its 8x1x1 and 2x2x2 programs.
# '+': that mesh also runs CALM's masked eval step and BrierLM's sampling.
GROUPS = (["1x1x1+,1x8x1+"], ["8x1x1,2x2x2", "--restore"])


def helper_env() -> dict:
  """The subprocess environment: this repo importable; the XLA flags (the suite's fast-compile
  ones, tests/conftest.py) are kept and completed by tests/sharded/common.py."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS"):
    env.pop(k, None)
  return env


def parse_result(name: str, returncode: int, out: str) -> dict:
  assert returncode == 0, f"{name} failed:\n{out[-6000:]}"
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert lines, f"{name} printed no RESULT:\n{out[-3000:]}"
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("parity")
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "sharded", "parity.py"), str(out_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=helper_env(),
                            cwd=os.path.join(HERE, "sharded")) for args in GROUPS]
  try:
    outs = [p.communicate(timeout=900)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = [parse_result(f"parity.py {' '.join(g)}", p.returncode, o) for g, p, o in zip(GROUPS, procs, outs)]
  merged = {"meshes": {}, "times": {}}
  for r in results:
    merged["meshes"].update(r["meshes"])
    merged["times"].update(r["times"])
    merged.update({k: v for k, v in r.items() if k not in ("meshes", "times")})
  print("parity helper timings (s since start):", merged["times"])
  merged["grads"] = {m: dict(np.load(out_dir / f"{m}.npz")) for m in ["1x1x1", *MESHES]}
  return merged


def _grads(parity, mesh, kind):
  g = parity["grads"][mesh]
  return [g[f"{kind}/{i}"] for i in range(sum(1 for k in g if k.startswith(kind + "/")))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mesh", MESHES)
def test_loss_and_grads_match_one_device(parity, kind, mesh):
  # One train step (trainers.make_train_step, jitted with the shardings, state donated).
  one, got = parity["meshes"]["1x1x1"], parity["meshes"][mesh]
  assert got["loss"][kind] == pytest.approx(one["loss"][kind], rel=1e-5, abs=1e-6)
  g1, gm = _grads(parity, "1x1x1", kind), _grads(parity, mesh, kind)
  assert len(g1) == len(gm) > 0
  scale = max(float(np.max(np.abs(x))) for x in g1)
  assert scale > 1e-3   # not vacuous: the gradients carry signal
  for a, b in zip(g1, gm):
    assert a.shape == b.shape
    assert float(np.max(np.abs(a - b))) <= 1e-5 * scale, (mesh, kind)


def test_sharded_energy_loss_equals_plain_pieces(parity):
  # On one device the shard_map loss (as trainers' eval step, with 3 padding rows) equals
  # EnergyModel.__call__ + losses.energy_loss with the same per-row draws.
  total, count = parity["meshes"]["1x1x1"]["eval"]
  assert count == 5 * 3   # 5 real rows x 3 predicted chunks
  assert total / count == pytest.approx(parity["energy_reference"], rel=1e-5)


def test_masked_eval_counts_rows_over_the_global_batch(parity):
  # 8 rows over 8 devices, the last 3 padding: per-device counts would differ from 15.
  assert parity["meshes"]["1x8x1"]["eval"] == pytest.approx(parity["meshes"]["1x1x1"]["eval"], rel=1e-5)


def test_parameters_are_actually_sharded(parity):
  # FSDP splits 'embed' over fsdp; tensor parallelism splits heads/mlp/vocab.
  specs = {m: parity["meshes"][m]["param_specs"] for m in MESHES}
  assert any("fsdp" in s for s in specs["1x8x1"])
  assert any("fsdp" in s for s in specs["2x2x2"]) and any("tensor" in s for s in specs["2x2x2"])
  assert specs["8x1x1"] == ["P()"]   # pure data parallel: replicated


def test_brier_sampling_per_device(parity):
  one, eight = parity["meshes"]["1x1x1"]["brier"], parity["meshes"]["1x8x1"]["brier"]
  # CALM K=4: noise per global row, so 8 devices draw what one device draws.  5 real rows
  # (3 masked) x 3 predicted chunks.
  assert one["energy"]["num_rows"] == 5 and one["energy"]["num_positions"] == 5 * 3
  assert eight["energy"] == pytest.approx(one["energy"], abs=1e-6)
  assert one["energy_no_mesh"] == pytest.approx(one["energy"], abs=1e-6)
  # Baseline (lowvar): rollouts per device with per-device keys, so Brier-2..4 differ between
  # meshes; Brier-1 has no sampling in it (2 P(y) - sum P^2) and must agree.  5 rows x (16-4).
  assert one["transformer"]["num_positions"] == eight["transformer"]["num_positions"] == 5 * 12
  assert eight["transformer"]["brier1"] == pytest.approx(one["transformer"]["brier1"], rel=1e-5)
  for n in (2, 3, 4):
    assert -1.0 <= eight["transformer"][f"brier{n}"] <= 2.0


def test_restore_onto_another_mesh(parity):
  r = parity["restore"]
  assert r["restored_step"] == 2
  assert r["shardings_match"], "restored arrays did not land on the new mesh's shardings"
  assert r["restored_diff"] == 0.0
  assert any("tensor" in s for s in r["specs_b"]) and any("fsdp" in s for s in r["specs_b"])
  # Training continues on (2,2,2) with the losses of the uninterrupted (8,1,1) run.
  assert r["continue_b"] == pytest.approx(r["continue_a"], rel=1e-5)
  assert r["first"][1] != r["first"][0] and r["continue_a"][0] != r["first"][1]  # training moved


# --------------------------------------------------------------------------- in-process (one device)


class _Shape:
  def __init__(self, data, fsdp, tensor):
    self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def test_rules_resolution():
  mesh = _Shape(1, 4, 2)
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(P("embed", "mlp"), mesh, None, (64, 128)) == P("fsdp", "tensor")
  # kv_heads=1 does not divide tensor=2: replicated; the large array falls back to fsdp on embed anyway.
  assert sharding.logical_to_spec(P("embed", "kv_heads", "head_dim"), mesh, None, (256, 1, 64)) == P("fsdp")
  # A mesh axis is used once per array: the second 'embed' stays replicated.
  assert sharding.logical_to_spec(P("embed", "embed"), mesh, None, (8, 8)) == P("fsdp")
  # Large array with no fsdp-mapped axis: its largest free divisible dim goes on fsdp.
  assert sharding.logical_to_spec(P("patch", "mlp"), mesh, None, (512, 64)) == P("fsdp", "tensor")
  rules = sharding.rules_from_config({"embed": "", "mlp": "fsdp,tensor"})
  assert sharding.logical_to_spec(P("embed", "mlp"), mesh, rules, (8, 64)) == P(None, ("fsdp", "tensor"))


def test_rules_table_round_trips_through_config_strings():
  table = sharding.rules_config()
  assert table["batch"] == "data,fsdp" and table["head_dim"] == "" and table["embed"] == "fsdp"
  assert sharding.rules_from_config(table) == sharding.DEFAULT_RULES
  assert sharding.rules_from_config({**table, "mlp": "fsdp,tensor"})["mlp"] == ("fsdp", "tensor")


def test_bad_mesh_and_rules_name_the_config_key():
  with pytest.raises(sharding.ShardingError, match="config.sharding_rules.embed"):
    sharding.rules_from_config({"embed": "model"})
  with pytest.raises(sharding.ShardingError, match="config.mesh"):
    sharding.mesh_shape(3, -1, 1, num_devices=8)
  with pytest.raises(sharding.ShardingError, match="config.mesh"):
    sharding.mesh_shape(-1, -1, 1, num_devices=8)
  assert sharding.mesh_shape(2, -1, 2, num_devices=8) == (2, 2, 2)


def test_memory_plan_verdicts_for_calm_xl():
  from calm_jax.cost import flops

  kind, cfg, ae = flops.paper_configs()["calm_xl"]
  cfg = cfg.replace(backbone=cfg.backbone.replace(dtype="bfloat16", remat_policy="dots"))
  work = memory.Workload(global_batch=256, seq_len=8192)
  gpu = memory.plan(kind, cfg, memory.TARGETS["gpu8x80"], work, ae)
  tpu = memory.plan(kind, cfg, memory.TARGETS["v5p-32"], work, ae)
  # Model state: 16 bytes per parameter over the FSDP group (4 param + 8 Adam + 4 grad).
  assert gpu.rows["params"] + gpu.rows["optimizer"] + gpu.rows["gradients"] == pytest.approx(
      16 * 1.8298e9 / 8, rel=0.01)
  assert tpu.rows["optimizer"] == pytest.approx(gpu.rows["optimizer"] / 2, rel=0.01)
  assert not gpu.fits and not tpu.fits    # the paper's 256 x 8192 batch needs accumulation
  acc = memory.smallest_accumulation(kind, cfg, memory.TARGETS["gpu8x80"], work, ae)
  assert acc is not None and acc.fits and acc.workload.grad_accum > 1
  assert "verdict" in gpu.report()
