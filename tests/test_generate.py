"""Tests for calm_jax.generation.generate: the cached, batched, jitted loop against a naive
per-row loop that recomputes the full forward (no cache, no padding) every step.

Tiny random models; the energy head's zero-initialised last layer is replaced by
random weights so that samples depend on the noise.  Seeds are fresh each run.
"""

import functools
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.generation import generate as gen
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.calm import EnergyModel
from calm_jax.models.transformer import TransformerLM

V, EOS, PAD = 24, 0, 23  # EOS = 0: the rigged decoder below emits only id 0


def backbone(**kw):
  return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, **kw)


def init(cfg, key):
  return jax.jit(models.init_params, static_argnums=0)(cfg, key)


def sharpen(params, path, scale):
  """Multiplies one kernel by `scale` (peaky distributions make the tests sensitive)."""
  params = jax.tree.map(lambda x: x, params)
  node = params
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = node[path[-1]] * scale
  return params


@pytest.fixture(scope="module")
def calm_model():
  key = jax.random.key(secrets.randbelow(2**31))
  k1, k2, k3 = jax.random.split(key, 3)
  ae_cfg = AutoencoderConfig(vocab_size=V, hidden_size=32, intermediate_size=64, latent_size=8, patch_size=2)
  cfg = EnergyConfig(backbone=backbone(scan_layers=True), patch_size=2, latent_size=8, noise_size=4,
                     num_mlp_layers=1)
  ae_params = sharpen(init(ae_cfg, k1), ("encoder", "embed_tokens", "embedding"), 30.0)
  params = init(cfg, k2)
  head = params["generative_head"]["final_linear_1"]
  head["kernel"] = jax.random.normal(k3, head["kernel"].shape) * 2.0
  return cfg, params, ae_cfg, ae_params


@pytest.fixture(scope="module")
def baseline_model():
  cfg = TransformerConfig(backbone=backbone())
  params = init(cfg, jax.random.key(secrets.randbelow(2**31)))
  return cfg, sharpen(params, ("lm_head", "kernel"), 40.0)


BUF = 24  # fixed buffer (tokens): one compile for every step; causal, so the tail never matters


@functools.partial(jax.jit, static_argnums=(0, 2))
def _calm_next(cfg, params, ae_cfg, ae_params, buf_1xT, last_slot, key, row_id):
  """No cache: the full forward over the buffer, the head at chunk slot `last_slot`."""
  h, _ = EnergyModel(cfg).apply({"params": params}, buf_1xT, method="hidden")
  noise = gen.row_noise(key, row_id[None], 1, cfg.noise_size)
  z = EnergyModel(cfg).apply({"params": params}, h[:, last_slot][None], noise, method="head")
  return jnp.argmax(Autoencoder(ae_cfg).apply({"params": ae_params}, z, method="decode"), -1).reshape(-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _baseline_next(cfg, params, buf_1xT, last, key, temperature):
  logits, _ = TransformerLM(cfg).apply({"params": params}, buf_1xT)
  return jax.random.categorical(key, logits[0, last] / temperature)


def naive_calm(cfg, params, ae_cfg, ae_params, prompt, key, steps, row_id, padding):
  """One row, no cache, no padding mask, the generator's key schedule."""
  k = cfg.patch_size
  fill = [PAD] * ((-len(prompt)) % k)
  tokens = (fill + list(prompt)) if padding == "left" else (list(prompt) + fill)
  out = []
  for s in range(steps):
    buf = jnp.asarray([tokens + [0] * (BUF - len(tokens))], jnp.int32)
    chunk = _calm_next(cfg, params, ae_cfg, ae_params, buf, len(tokens) // k - 1, jax.random.fold_in(key, s),
                       jnp.int32(row_id))
    chunk = [int(t) for t in np.asarray(chunk)]
    out += chunk
    tokens += chunk
    if EOS in chunk:
      out = out[:out.index(EOS) + 1]
      break
  return [t for t in out if t != PAD]


def naive_baseline(cfg, params, prompt, key, steps, row_id, temperature):
  tokens, out = list(prompt), []
  for s in range(steps):
    buf = jnp.asarray([tokens + [0] * (BUF - len(tokens))], jnp.int32)
    kr = jax.random.fold_in(jax.random.fold_in(key, s), row_id)
    tok = int(_baseline_next(cfg, params, buf, len(tokens) - 1, kr, temperature))
    out.append(tok)
    tokens.append(tok)
    if tok == EOS:
      break
  return [t for t in out if t != PAD]


def random_prompts(rng, lengths):
  return [list(rng.integers(2, V - 1, n)) for n in lengths]


@pytest.mark.parametrize("padding", ["left", "end"])
def test_calm_cache_equals_full_recompute_ragged(calm_model, padding):
  cfg, params, ae_cfg, ae_params = calm_model
  rng = np.random.default_rng(secrets.randbelow(2**31))
  prompts = random_prompts(rng, [5, 2, 8])  # odd lengths: padded inside a chunk
  key = jax.random.key(int(rng.integers(2**31)))
  settings = gen.GenerationSettings(max_new_tokens=12, temperature=1.0, prompt_padding=padding,
                                    steps_per_call=4)
  out = gen.generate("energy", cfg, params, prompts, key, settings, eos_id=EOS, pad_id=PAD, ae_cfg=ae_cfg,
                     ae_params=ae_params)
  for b, p in enumerate(prompts):
    want = naive_calm(cfg, params, ae_cfg, ae_params, p, key, 6, b, padding)
    assert list(out.tokens[b]) == want, (b, padding)
  assert out.num_tokens == sum(len(t) for t in out.tokens) > 0


def test_baseline_cache_equals_full_recompute_ragged(baseline_model):
  cfg, params = baseline_model
  rng = np.random.default_rng(secrets.randbelow(2**31))
  prompts = random_prompts(rng, [3, 7, 1])
  key = jax.random.key(int(rng.integers(2**31)))
  settings = gen.GenerationSettings(max_new_tokens=9, temperature=0.5)
  out = gen.generate("transformer", cfg, params, prompts, key, settings, eos_id=EOS, pad_id=PAD)
  for b, p in enumerate(prompts):
    assert list(out.tokens[b]) == naive_baseline(cfg, params, p, key, 9, b, 0.5), b


def test_calm_tempered_sampling_shapes_and_eos(calm_model):
  """T = 1/2 (batch and exact): whole chunks of valid ids, nothing after the first EOS."""
  cfg, params, ae_cfg, ae_params = calm_model
  rng = np.random.default_rng(secrets.randbelow(2**31))
  prompts = random_prompts(rng, [4, 3, 6, 2])
  key = jax.random.key(int(rng.integers(2**31)))
  for method in ("batch",):   # the exact samplers' wiring is the same draw(); their maths: test_sampling
    settings = gen.GenerationSettings(max_new_tokens=7, temperature=0.5, method=method, num_candidates=32)
    out = gen.generate("energy", cfg, params, prompts, key, settings, eos_id=EOS, pad_id=PAD, ae_cfg=ae_cfg,
                       ae_params=ae_params)
    assert len(out.tokens) == 4 and out.capped.shape == (4,) and out.lengths.shape == (4,)
    for t, n in zip(out.tokens, out.lengths):
      assert len(t) <= n <= 7 and np.all((t >= 0) & (t < V)) and PAD not in t
      assert EOS not in t[:-1]
      # A row stops early only at EOS; sampled PADs are dropped from the tokens, not from lengths.
      if n < 7 and (len(t) == 0 or t[-1] != EOS):
        raise AssertionError(f"row stopped after {n} positions without EOS: {t}")


def test_forced_eos_stops_rows(calm_model):
  """A decoder rigged to output all-zero logits decodes every token as id 0 = EOS: every row
  stops after its first chunk, cut right after the EOS.  (Same shapes as the test above:
  no new compilation.)"""
  cfg, params, ae_cfg, ae_params = calm_model
  rigged = jax.tree.map(lambda x: x, ae_params)
  rigged["decoder"]["norm"]["scale"] = jnp.zeros_like(rigged["decoder"]["norm"]["scale"])
  settings = gen.GenerationSettings(max_new_tokens=12, temperature=1.0, steps_per_call=4)
  prompts = random_prompts(np.random.default_rng(0), [5, 2, 8])
  out = gen.generate("energy", cfg, params, prompts, jax.random.key(0), settings, eos_id=EOS, pad_id=PAD,
                     ae_cfg=ae_cfg, ae_params=rigged)
  assert [list(t) for t in out.tokens] == [[EOS]] * 3


def test_invalid_temperature_names_allowed_values(calm_model):
  cfg, params, ae_cfg, ae_params = calm_model
  with pytest.raises(ValueError, match=r"1/2, 1/3"):
    gen.generate("energy", cfg, params, [[3]], jax.random.key(0), gen.GenerationSettings(temperature=0.4),
                 eos_id=EOS, pad_id=PAD, ae_cfg=ae_cfg, ae_params=ae_params)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    gen.GenerationSettings(temperature=1.5, method="two_stage").validate("energy")


def test_pack_prompts_layout():
  batch = gen.pack_prompts([[7, 8, 9], [5]], 2, PAD, "left")
  np.testing.assert_array_equal(batch.tokens_BxP, [[PAD, 7, 8, 9], [PAD, PAD, PAD, 5]])
  np.testing.assert_array_equal(batch.valid_BxS, [[True, True], [False, True]])
  np.testing.assert_array_equal(batch.positions_BxS, [[0, 1], [0, 0]])
  np.testing.assert_array_equal(batch.next_position_B, [2, 1])
  end = gen.pack_prompts([[7, 8, 9]], 2, PAD, "end")
  np.testing.assert_array_equal(end.tokens_BxP, [[7, 8, 9, PAD]])
