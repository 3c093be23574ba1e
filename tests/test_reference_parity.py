"""Parity with the authors' PyTorch code, both directions.

Needs a Python with torch and transformers (``CALM_REFERENCE_PYTHON``, default:
this interpreter) and a checkout of github shaochenze/calm
(``CALM_REFERENCE_DIR``); skipped otherwise.  The reference builds random
models and saves them; calm_jax imports them and must reproduce the
autoencoder's mean, log-std and logits, the backbone's hidden states, the
head's output for given noise, the energy score for given samples, and the
baseline's logits within 1e-4 relative error (fp32).  For the diffusion and
flow heads (``DiffusionTransformer``, ``FlowTransformer``, imported from their
``save_pretrained`` folders): the diffusion tables and respaced timesteps, the
adaLN network's output, the training losses for given t (0 and 999 included),
noise and targets (and the gradient that shows the diffusion mean detached in
the bound), the samplers' outputs for injected noise (DDPM; flow midpoint and
Euler) and the whole model's loss.  Then calm_jax exports the imported weights,
the reference loads the exported folders and must produce the same outputs again.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jax

from calm_jax import interop, models
from calm_jax.models import heads, losses
from calm_jax.models.heads import adaln_mlp, diffusion, flow
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
      # the diffusion and flow heads (D = 64; N = 8 replicates x P = 8 positions for the whole model)
      "net_x": rng.normal(size=(6, lat)).astype(np.float32),
      "net_t_int": np.array([0, 999, 1, 500, 998, 37], np.int64),
      "net_t_flow": np.array([0.0, 0.9995, 0.0004, 0.5, 0.25, 0.77], np.float32),
      "net_c": rng.normal(size=(6, 64)).astype(np.float32),
      "dl_target": (rng.normal(size=(6, lat)) * 0.7).astype(np.float32),
      "dl_noise": rng.normal(size=(6, lat)).astype(np.float32),
      "fl_target": rng.normal(size=(6, lat)).astype(np.float32),
      "fl_x0": rng.normal(size=(6, lat)).astype(np.float32),
      "ds_c": rng.normal(size=(3, 64)).astype(np.float32),
      "ds_noise": rng.normal(size=(3, 100, lat)).astype(np.float32),
      "fs_noise": rng.normal(size=(3, lat)).astype(np.float32),
      "m_eps": rng.normal(size=(8, 8, lat)).astype(np.float32),
      "m_t_int": np.concatenate([[0, 999], rng.integers(0, 1000, 62)]).astype(np.int64),
      "m_noise": rng.normal(size=(64, lat)).astype(np.float32),
      "m_t_flow": rng.random(64).astype(np.float32),
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
  imported = {name: interop.import_energy(f"{folder}/{name}") for name in ("diffusion", "flow")}
  for name, (h_cfg, h_p, h_ae_cfg, h_ae_p) in imported.items():
    assert h_cfg.head == name
    out.update(_ours_head(name, h_cfg, h_p, h_ae_cfg, h_ae_p, inp))
  return out, (ae_cfg, ae_p, cfg, p, ae_cfg2, ae_p2, t_cfg, t_p), imported


def _ours_head(name, cfg, p, ae_cfg, ae_p, inp):
  """Our numbers for the reference's head outputs (driver.head_outputs), from imported weights."""
  a = lambda k: jnp.asarray(inp[k])
  hp, head = p["generative_head"], heads.get(cfg)
  net = adaln_mlp.AdaLNMLP(cfg, head.module().out_channels)
  net_out = lambda x, t, c: net.apply({"params": hp["net"]}, x, t, c)
  out = {}
  if name == "diffusion":
    for tag, tab in (("train", diffusion.train_tables()), ("gen", diffusion.respaced(100)[0])):
      for f in ("betas", "alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
                "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
        out[f"tab_{tag}_{f}"] = tab[f]
    out["tab_train_map"] = np.arange(diffusion.NUM_TIMESTEPS)
    out["tab_gen_map"] = diffusion.respaced(100)[1]
    out["diffusion_net"] = net_out(a("net_x"), a("net_t_int"), a("net_c"))
    x0, t, noise = a("dl_target"), a("net_t_int"), a("dl_noise")
    o = net_out(diffusion.q_sample(x0, t, noise), t, a("net_c"))
    out["diffusion_mse"], out["diffusion_vb"] = diffusion.hybrid_loss_terms(o, x0, t, noise)
    out["diffusion_loss"] = head.replicate_losses(hp, a("net_c"), x0, t, noise)
    g = jax.grad(lambda q: jnp.sum(head.replicate_losses(q, a("net_c"), x0, t, noise)))(hp)
    out["diffusion_grad_out"] = g["net"]["final_layer"]["linear"]["kernel"].T
    out["diffusion_sample"] = head.sample(hp, a("ds_c"), a("ds_noise"))
  else:
    out["flow_net"] = net_out(a("net_x"), flow.quantised_time(a("net_t_flow")), a("net_c"))
    out["flow_loss"] = head.replicate_losses(hp, a("net_c"), a("fl_target"), a("net_t_flow"), a("fl_x0"))
    out["flow_sample_midpoint"] = head.sample(hp, a("ds_c"), a("fs_noise"))
    euler = heads.get(cfg.replace(flow_sampling_steps=20, flow_solver="euler"))
    out["flow_sample_euler"] = euler.sample(hp, a("ds_c"), a("fs_noise"))
  # The whole model: backbone -> head loss against the frozen AE's posterior, the reference's draws.
  toks = jnp.asarray(inp["lm_tokens"], jnp.int32)
  k = cfg.patch_size
  h, _ = EnergyModel(cfg).apply({"params": p}, toks[:, :-k], method="hidden")          # B x S x D
  mean, log_std = models.encode_targets(ae_cfg, ae_p, toks[:, k:])
  n, (b, s) = cfg.num_samples, h.shape[:2]
  x0 = mean[None] + a("m_eps").reshape(n, b, s, -1) * jnp.exp(log_std)[None]
  if name == "diffusion":
    draws = (a("m_t_int").reshape(n, b, s), a("m_noise").reshape(n, b, s, -1))
  else:
    draws = (a("m_t_flow").reshape(n, b, s), a("m_noise").reshape(n, b, s, -1))
  out[f"{name}_model_loss"] = jnp.mean(head.replicate_losses(hp, h[None], x0, *draws))
  return out


HEAD_KEYS = ("diffusion_net", "diffusion_mse", "diffusion_vb", "diffusion_loss", "diffusion_grad_out",
             "diffusion_sample", "diffusion_model_loss", "flow_net", "flow_loss", "flow_sample_midpoint",
             "flow_sample_euler", "flow_model_loss")


def _compare(ours, ref, inp):
  for key in ("ae_mean", "ae_log_std", "ae_logits", "energy_hidden", "energy_head",
              "llama_logits") + HEAD_KEYS:
    assert _rel(ours[key], ref[key]) < RTOL, (key, _rel(ours[key], ref[key]))
  for key in [k for k in ref if k.startswith("tab_")]:   # float64 tables and the respaced timesteps
    np.testing.assert_allclose(ours[key], ref[key], rtol=1e-12, atol=0, err_msg=key)
  # Elementwise too: the t = 0 (discretised-Gaussian) and t = 999 terms are single entries.
  np.testing.assert_allclose(ours["diffusion_vb"], ref["diffusion_vb"], rtol=RTOL, atol=1e-6)
  score = losses.energy_score(jnp.asarray(inp["x_samples"]), jnp.asarray(ref["y_samples"]), 1.0)
  assert _rel(score, ref["energy_score"]) < RTOL
  score_gram = losses.energy_score(jnp.asarray(inp["x_samples"]), jnp.asarray(ref["y_samples"]), 1.0, "gram")
  assert _rel(score_gram, ref["energy_score"]) < RTOL


def test_reference_to_calm_jax_and_back(tmp_path):
  inp = _inputs(np.random.default_rng(0))
  np.savez(tmp_path / "inputs.npz", **inp)
  _run("create", tmp_path)
  ref = dict(np.load(tmp_path / "outputs.npz"))
  ours, (ae_cfg, ae_p, cfg, p, ae_cfg2, ae_p2, t_cfg, t_p), imported = _ours(tmp_path, inp)
  _compare(ours, ref, inp)
  # Export what we imported; the reference must load it and agree with itself.
  back = tmp_path / "back"
  back.mkdir()
  np.savez(back / "inputs.npz", **inp)
  interop.export_autoencoder(str(back / "ae"), ae_cfg, ae_p)
  interop.export_energy(str(back / "energy"), cfg, p, ae_cfg2, ae_p2)
  interop.export_transformer(str(back / "llama"), t_cfg, t_p)
  for name, (h_cfg, h_p, h_ae_cfg, h_ae_p) in imported.items():
    interop.export_energy(str(back / name), h_cfg, h_p, h_ae_cfg, h_ae_p)
    again = interop.import_energy(str(back / name))       # and our own export reads back the same
    assert again[0] == h_cfg
    jax.tree.map(np.testing.assert_array_equal, again[1], h_p)
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

