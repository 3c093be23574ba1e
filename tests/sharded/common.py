"""Shared pieces of the simulated-device helper scripts (each runs in its own process).

Every script sets the CPU device count *before* JAX starts, prints one JSON line
prefixed ``RESULT `` that the pytest side parses, and keeps configs tiny: these
scripts are bound by XLA's compile time, so each compiles as few programs as it can.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# XLA:CPU compile-time settings for these compile-bound scripts.  The first two are the
# suite's (tests/conftest.py); the new fusion emitters cost ~5x more compile time on
# these small programs.  All three change code generation only: the arithmetic is the
# same up to float reassociation, which the fp32 tolerances cover.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


WORKERS_PER_DEVICE = 4


def set_cpu_devices(n: int) -> None:
  """``n`` fake CPU devices; must run before anything initialises JAX's backends."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = os.environ.get("XLA_FLAGS", "").split()
  have = {f.split("=")[0] for f in flags}
  flags += [f for f in FAST_COMPILE.split() if f.split("=")[0] not in have]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  # XLA:CPU sizes its worker pool max(cores, devices): with 8 devices on 2 cores, 8 threads.
  # Each collective waiting for its peers parks a worker, and a device whose next step is
  # queued behind parked workers never arrives -- a starvation deadlock that XLA ends after
  # 40 s by aborting the process (seen in CI: all 8 workers parked in all-reduces and a
  # collective-permute while 4 devices had not started their part).  Spare threads cost
  # nothing while parked; a caller's own PJRT_NPROC wins.
  os.environ.setdefault("PJRT_NPROC", str(WORKERS_PER_DEVICE * n))
  import jax

  jax.config.update("jax_num_cpu_devices", n)
  jax.config.update("jax_threefry_partitionable", True)  # draws independent of the sharding (the default)


def emit(result) -> None:
  print("RESULT " + json.dumps(result), flush=True)


def tiny_configs():
  """(ae_cfg, energy_cfg, transformer_cfg): small but with every axis divisible on the test meshes."""
  from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig

  ae = AutoencoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=4,
                         ae_dropout=0.1)
  bb = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64, scan_layers=True)
  energy = EnergyConfig(backbone=bb, patch_size=4, latent_size=8, noise_size=8, num_mlp_layers=1, num_samples=4,
                        num_target_samples=6)
  return ae, energy, TransformerConfig(backbone=bb)


def random_params(cfg, seed: int, scale: float = 0.2):
  """Parameters drawn on the host (no init program to compile): norm scales near 1, the rest
  ``scale * N(0, 1)`` -- not a trained model, but every parameter carries gradient signal
  (the energy head's last layer, zero at initialisation, included)."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)

  def one(path, x):
    noise = scale * rng.standard_normal(x.shape).astype(np.float32)
    return (1.0 + noise) if jax.tree_util.keystr(path).endswith("['scale']") else noise

  from calm_jax import models

  return jax.tree_util.tree_map_with_path(one, models.abstract_params(cfg))


def max_abs_diff(a, b) -> float:
  import jax
  import numpy as np

  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b), strict=True))


def max_abs(a) -> float:
  import jax
  import numpy as np

  return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))
