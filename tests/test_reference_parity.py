"""Parity with the authors' PyTorch code, both directions.

Needs a Python with torch and transformers (``CALM_REFERENCE_PYTHON``, default:
this interpreter) and a checkout of github shaochenze/calm
(``CALM_REFERENCE_DIR``); skipped otherwise.  The reference builds random
models and saves them; calm_jax imports them and must reproduce the
autoencoder's mean, log-std and logits, the backbone's hidden states, the
head's output for given noise, the energy score for given samples, and the
baseline's logits within 1e-4 relative error (fp32).  Then calm_jax exports
the imported weights, the reference loads the exported folders and must
produce the same outputs again.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import interop
from calm_jax.models import losses
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.calm import EnergyModel
from calm_jax.models.transformer import TransformerLM

REF_DIR = os.environ.get("CALM_REFERENCE_DIR")
REF_PY = os.environ.get("CALM_REFERENCE_PYTHON", sys.executable)
DRIVER = os.path.join(os.path.dirname(__file__), "reference", "driver.py")
RTOL = 1e-4


def _ref_available():
  if not REF_DIR or not os.path.isdir(os.path.join(REF_DIR, "models")):
    return False
  r = subprocess.run([REF_PY, "-c", "import torch, transformers"], capture_output=True)
  return r.returncode == 0


pytestmark = [pytest.mark.reference,
              pytest.mark.skipif(not _ref_available(),
                                 reason="set CALM_REFERENCE_DIR (and CALM_REFERENCE_PYTHON with torch+transformers)")]


def _run(mode, out):
  env = dict(os.environ, CALM_REFERENCE_DIR=REF_DIR, CUDA_VISIBLE_DEVICES="")
  r = subprocess.run([REF_PY, DRIVER, mode, str(out)], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr[-3000:]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _inputs(rng):
  k, lat = 4, 16
  return {
      "ae_tokens": rng.integers(0, 97, (2, 12)).astype(np.int64),
      "ae_z": rng.normal(size=(5, lat)).astype(np.float32),
      "lm_tokens": rng.integers(0, 97, (2, 20)).astype(np.int64),
      "noise": (rng.random((2, 20 // k, 8)) - 0.5).astype(np.float32),
      "x_samples": rng.normal(size=(8, 6, lat)).astype(np.float32),
      "y_mean": rng.normal(size=(6, lat)).astype(np.float32),
      "y_log_std": (rng.normal(size=(6, lat)) * 0.3 - 1.0).astype(np.float32),
  }


def _ours(folder, inp):
  out = {}
  ae_cfg, ae_p = interop.import_autoencoder(f"{folder}/ae")
  ae = Autoencoder(ae_cfg)
  mean, log_std = ae.apply({"params": ae_p}, jnp.asarray(inp["ae_tokens"], jnp.int32), method="encode")
  out["ae_mean"], out["ae_log_std"] = mean.reshape(-1, mean.shape[-1]), log_std.reshape(-1, mean.shape[-1])
  out["ae_logits"] = ae.apply({"params": ae_p}, jnp.asarray(inp["ae_z"])[:, None], method="decode")[:, 0]
  cfg, p, ae_cfg2, ae_p2 = interop.import_energy(f"{folder}/energy")
  assert ae_cfg2.latent_size == ae_cfg.latent_size
  m = EnergyModel(cfg)
  toks = jnp.asarray(inp["lm_tokens"], jnp.int32)
  h, _ = m.apply({"params": p}, toks, method="hidden")
  out["energy_hidden"] = h
  out["energy_head"] = m.apply({"params": p}, h, jnp.asarray(inp["noise"]), method="head")
  t_cfg, t_p = interop.import_transformer(f"{folder}/llama")
  out["llama_logits"] = TransformerLM(t_cfg).apply({"params": t_p}, toks)[0]
  return out, (ae_cfg, ae_p, cfg, p, ae_cfg2, ae_p2, t_cfg, t_p)


def _compare(ours, ref, inp):
  for key in ("ae_mean", "ae_log_std", "ae_logits", "energy_hidden", "energy_head", "llama_logits"):
    assert _rel(ours[key], ref[key]) < RTOL, (key, _rel(ours[key], ref[key]))
  score = losses.energy_score(jnp.asarray(inp["x_samples"]), jnp.asarray(ref["y_samples"]), 1.0)
  assert _rel(score, ref["energy_score"]) < RTOL
  score_gram = losses.energy_score(jnp.asarray(inp["x_samples"]), jnp.asarray(ref["y_samples"]), 1.0, "gram")
  assert _rel(score_gram, ref["energy_score"]) < RTOL


def test_reference_to_calm_jax_and_back(tmp_path):
  inp = _inputs(np.random.default_rng(0))
  np.savez(tmp_path / "inputs.npz", **inp)
  _run("create", tmp_path)
  ref = dict(np.load(tmp_path / "outputs.npz"))
  ours, (ae_cfg, ae_p, cfg, p, ae_cfg2, ae_p2, t_cfg, t_p) = _ours(tmp_path, inp)
  _compare(ours, ref, inp)
  # Export what we imported; the reference must load it and agree with itself.
  back = tmp_path / "back"
  back.mkdir()
  np.savez(back / "inputs.npz", **inp)
  interop.export_autoencoder(str(back / "ae"), ae_cfg, ae_p)
  interop.export_energy(str(back / "energy"), cfg, p, ae_cfg2, ae_p2)
  interop.export_transformer(str(back / "llama"), t_cfg, t_p)
  _run("load", back)
  ref2 = dict(np.load(back / "outputs.npz"))
  for key in ref:
    np.testing.assert_allclose(ref2[key], ref[key], rtol=0, atol=1e-6 * max(1.0, np.max(np.abs(ref[key]))))


def test_renamed_key_is_refused(tmp_path):
  inp = _inputs(np.random.default_rng(1))
  np.savez(tmp_path / "inputs.npz", **inp)
  _run("create", tmp_path)
  sd = interop.read_state_dict(str(tmp_path / "llama"))
  sd["model.layers.0.mlp.gate_projection.weight"] = sd.pop("model.layers.0.mlp.gate_proj.weight")
  interop.write_state_dict(str(tmp_path / "llama"), sd)
  with pytest.raises(interop.InteropError, match="model.layers.0.mlp.gate_proj.weight"):
    interop.import_transformer(str(tmp_path / "llama"))

