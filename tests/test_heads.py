"""The generative heads behind one interface: diffusion and flow train, sample through every path
(BrierLM, generation with each temperature method, per-device sampling on 8 simulated devices), and
their tables, time quantisation, initialisation, cost and interop hold.  The energy head's numbers
are covered by test_models / test_evaluate / test_generate / test_sharding, unchanged.

Parity with the authors' code: tests/test_reference_parity.py.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax import interop, models
from calm_jax.configs import AutoencoderConfig, ConfigError, EnergyConfig, LlamaConfig
from calm_jax.cost import flops
from calm_jax.evaluation import evaluate
from calm_jax.generation import generate as gen
from calm_jax.models import heads
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.backbone import init_cache
from calm_jax.models.calm import EnergyModel
from calm_jax.models.heads import adaln_mlp, diffusion, flow
from calm_jax.parallel import sharded_losses

HERE = os.path.dirname(os.path.abspath(__file__))
V, K = 24, 2
BB = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4,
                 num_key_value_heads=2, scan_layers=True)
AE = AutoencoderConfig(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=K)
NEW_HEADS = ("diffusion", "flow")


def _cfg(head, **kw):
  return EnergyConfig(backbone=BB, patch_size=K, latent_size=8, num_mlp_layers=1, num_samples=4, head=head,
                      diffusion_sampling_steps=3, flow_sampling_steps=2, **kw)


def _random(cfg, seed, scale=0.3):
  """Host-drawn parameters (no init program); the heads' zero-initialised layers get values too."""
  rng = np.random.default_rng(seed)
  def one(path, x):
    noise = scale * rng.standard_normal(x.shape).astype(np.float32)
    return (1.0 + noise) if jax.tree_util.keystr(path).endswith("['scale']") else noise
  return jax.tree_util.tree_map_with_path(one, models.abstract_params(cfg))


@functools.lru_cache(maxsize=None)
def _ae_params():
  p = _random(AE, 0)
  p["encoder"]["embed_tokens"]["embedding"] = p["encoder"]["embed_tokens"]["embedding"] * 30.0
  return p


# ----------------------------------------------------------------------------- tables and pieces


def test_diffusion_tables_match_the_reference_schedule():
  tab = diffusion.train_tables()
  assert tab["betas"].dtype == np.float64 and tab["betas"].shape == (1000,)
  np.testing.assert_allclose(tab["betas"][0], 4.13e-5, rtol=2e-3)
  assert tab["betas"][-1] == diffusion.MAX_BETA                     # clipped
  np.testing.assert_allclose(tab["alphas_cumprod"][-1], 2.43e-9, rtol=1e-2)
  sp, keep = diffusion.respaced(100)
  assert len(keep) == 100 and list(keep[:11]) == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101]
  assert list(keep[-5:]) == [959, 969, 979, 989, 999]
  np.testing.assert_allclose(sp["betas"][[0, -1]], [4.13e-5, 0.99999], rtol=2e-3)
  # Respacing keeps abar at the kept steps (up to the float64 rounding of a re-taken cumprod).
  np.testing.assert_allclose(sp["alphas_cumprod"], tab["alphas_cumprod"][keep], rtol=1e-10)
  assert diffusion.space_timesteps(1000, 1000) == list(range(1000))


def test_flow_time_is_floored_to_thousandths_in_fp32():
  ts = np.array([k / 10 for k in range(10)], np.float32)
  mids = ts + np.float32(0.05)
  assert list(np.asarray(flow.quantised_time(ts))) == list(range(0, 1000, 100))
  assert list(np.asarray(flow.quantised_time(mids))) == list(range(50, 1000, 100))
  assert int(flow.quantised_time(np.float32(0.9999))) == 999


def test_sinusoidal_embedding_is_cos_then_sin():
  e = np.asarray(adaln_mlp.timestep_embedding(jnp.array([0, 3])))
  assert e.shape == (2, 256)
  np.testing.assert_array_equal(e[0, :128], 1.0)
  np.testing.assert_array_equal(e[0, 128:], 0.0)
  np.testing.assert_allclose(e[1, [0, 128]], [np.cos(3.0), np.sin(3.0)], rtol=1e-6)


def test_init_outputs_zero_and_counts_match():
  for head in NEW_HEADS:   # the analytic counts (calm_jax.cost.flops) against the built parameters
    cfg = _cfg(head)
    assert models.count_params(models.abstract_params(cfg)["generative_head"]) == \
        sum(heads.get(cfg).param_counts().values())
  cfg = _cfg("diffusion")   # the flow head's network is the same module with L outputs instead of 2L
  hp = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))["generative_head"]
  out = heads.get(cfg).module().apply({"params": hp}, jnp.ones((3, 8)), jnp.array([0, 5, 999]),
                                      jnp.ones((3, 32)))
  np.testing.assert_array_equal(out, 0.0)                           # adaLN and output layers zeroed
  w = np.asarray(hp["net"]["res_blocks_0"]["mlp_0"]["kernel"])
  bound = np.sqrt(6.0 / 64)                                         # xavier_uniform(32, 32)
  assert np.max(np.abs(w)) <= bound and np.std(w) > 0.8 * bound / np.sqrt(3)
  assert np.all(np.asarray(hp["net"]["res_blocks_0"]["mlp_0"]["bias"]) == 0)


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="^head:"):
    _cfg("mdn")
  with pytest.raises(ConfigError, match="^diffusion_sampling_steps:"):
    _cfg("diffusion").replace(diffusion_sampling_steps=1)
  with pytest.raises(ConfigError, match="^flow_solver:"):
    _cfg("flow").replace(flow_solver="rk4")
  _cfg("flow").replace(num_samples=1)      # one replicate is fine off the energy head


def test_flops_are_per_call_cost_times_calls():
  for head in NEW_HEADS:
    cfg = _cfg(head)
    h = heads.get(cfg)
    double = heads.get(h.with_sampling_steps(2 * (cfg.diffusion_sampling_steps if head == "diffusion"
                                                  else cfg.flow_sampling_steps)))
    assert double.network_calls == 2 * h.network_calls
    cond = 2.0 * 32 * 32                                            # cond_embed: once per position
    assert np.isclose(double.forward_flops(5, False) - cond, 2 * (h.forward_flops(5, False) - cond))
    assert h.forward_flops(5, True) == heads.get(double.cfg).forward_flops(5, True)   # training: one call
  f = flops.flops_per_token("energy", _cfg("flow"), 16, train=False, ae_cfg=AE)
  assert f.head == heads.get(_cfg("flow")).forward_flops(1, False) / K
  assert heads.get(_cfg("flow").replace(flow_solver="euler")).network_calls == 2


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("head", NEW_HEADS)
def test_head_trains(head):
  cfg = _cfg(head)
  params = _random(cfg, 1, scale=0.1)
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, V)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt, key):
    (loss, m), g = jax.value_and_grad(lambda q: models.energy_loss_fn(cfg, AE, q, _ae_params(), tokens, key),
                                      has_aux=True)(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt, loss, m

  opt = tx.init(params)
  key = jax.random.key(3)      # fixed draws: the same objective every step
  losses = []
  for _ in range(15):
    params, opt, loss, m = step(params, opt, key)
    losses.append(float(loss))
  assert set(m) == {"loss", f"{head}_loss"}
  assert np.isfinite(losses).all() and min(losses[-3:]) < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------- sampling paths


@pytest.mark.parametrize("head", NEW_HEADS)
def test_brier_and_generation_sample_the_head(head):
  cfg = _cfg(head)
  params = _random(cfg, 4)
  ae_p = _ae_params()
  h_cls = heads.get(cfg)
  toks = jax.random.randint(jax.random.key(5), (2, 12), 0, V)
  key = jax.random.key(6)
  # BrierLM's teacher-forced samples are the head's samples of the per-row noise, decoded.
  p1, p2, target, _ = jax.jit(lambda p, a, t, k: evaluate.calm_teacher_forced(cfg, AE, p, a, t, k))(
      params, ae_p, toks, key)
  h, _ = EnergyModel(cfg).apply({"params": params}, toks[:, :-K], method="hidden")
  z = h_cls.sample(params["generative_head"], h[None], sharded_losses.row_noise(cfg, key, jnp.arange(2), 5,
                                                                                2))
  direct = jnp.argmax(Autoencoder(AE).apply({"params": ae_p}, z, method="decode"), -1)
  np.testing.assert_array_equal(p1, direct[0])
  np.testing.assert_array_equal(p2, direct[1])
  assert not np.array_equal(np.asarray(z[0]), np.asarray(z[1]))    # two different samples
  # K = 2 < 4: the full block with its rollout collisions (one head here, for time; the K >= 4 form and
  # the per-device one run for both heads in tests/sharded/heads.py).
  if head == "diffusion":
    per_pos = jax.jit(lambda p, a, t, k: evaluate.calm_brier_block(cfg, AE, p, a, t, k,
                                                                   evaluate.BrierSettings()))(
        params, ae_p, toks, key)
    assert per_pos.shape[0] == 2 and np.all((np.asarray(per_pos) >= -1) & (np.asarray(per_pos) <= 1))
  # Generation: the first chunk at T = 1 is the head's draw of the step's row noise.
  prompts, pad, eos = [[1, 2, 3, 4], [5, 6]], V - 1, V + 5
  g = gen.generate("energy", cfg, params, prompts, key, gen.GenerationSettings(max_new_tokens=4), eos_id=eos,
                   pad_id=pad, ae_cfg=AE, ae_params=ae_p)
  batch = gen.pack_prompts(prompts, K, pad)
  cache = init_cache(cfg.backbone, 2, batch.valid_BxS.shape[1] + 2)
  hp, _ = EnergyModel(cfg).apply({"params": params}, jnp.asarray(batch.tokens_BxP),
                                 jnp.asarray(batch.positions_BxS),
                                 cache, jnp.asarray(batch.valid_BxS), method="hidden")
  first = np.asarray(gen.calm_draw_fn(cfg, AE, params, ae_p, hp[:, -1],
                                      jnp.arange(2))(jax.random.fold_in(key, 0), 1)[0])
  for row, chunk in zip(g.tokens, first):
    kept = chunk[chunk != pad]                                      # PADs are removed from the text
    np.testing.assert_array_equal(row[:len(kept)], kept)
  # The temperature samplers only see the draw function; between them the two heads run all three.
  for method, temp in {"diffusion": (("batch", 0.5), ("rejection", 0.5)),
                       "flow": (("two_stage", 0.7), ("batch", 0.5))}[head]:
    g = gen.generate("energy", cfg, params, prompts, key,
                     gen.GenerationSettings(max_new_tokens=2, temperature=temp, method=method,
                                            num_candidates=8, max_attempts=32),
                     eos_id=eos, pad_id=pad, ae_cfg=AE, ae_params=ae_p)
    assert list(g.lengths) == [2, 2] and all(0 <= t < V for row in g.tokens for t in row), (method, g.tokens)


def test_samples_are_the_same_on_one_and_eight_devices():
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS"):
    env.pop(k, None)
  r = subprocess.run([sys.executable, os.path.join(HERE, "sharded", "heads.py")], capture_output=True,
                     text=True,
                     env=env, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  import json
  res = json.loads([line for line in r.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
  for head in NEW_HEADS:
    x = res[head]
    assert x["samples_spread"] > 1e-3 and x["samples_max_abs_diff"] <= 1e-5 * x["samples_scale"], x
    assert np.isclose(x["loss_one"], x["loss_eight"], rtol=1e-5, atol=0), x
    np.testing.assert_allclose(x["brier_one"], x["brier_eight"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- interop


@pytest.mark.parametrize("head", NEW_HEADS)
def test_interop_round_trip(head, tmp_path):
  cfg = _cfg(head).replace(diffusion_sampling_steps=50, flow_solver="euler")
  p, ae_p = _random(cfg, 7), _ae_params()
  sd = interop.export_energy(str(tmp_path / head), cfg, p, AE, ae_p)
  assert "generative_head.net.res_blocks.0.adaLN_modulation.1.weight" in sd
  assert not any(k.startswith("mlp_generator.") for k in sd)
  cfg2, p2, ae_cfg2, _ = interop.import_energy(str(tmp_path / head), scan_layers=True)
  assert cfg2 == cfg and ae_cfg2 == AE
  jax.tree.map(np.testing.assert_array_equal, p2, jax.tree.map(np.asarray, p))
  other = "flow" if head == "diffusion" else "diffusion"
  cj = interop.read_config_json(str(tmp_path / head))
  with pytest.raises(interop.InteropError, match="model_type"):
    interop.energy_config_from_json(dict(cj, model_type=other), head=head)
