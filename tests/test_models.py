"""Shapes, dtypes, causality, the KV cache and the head's purity, on tiny models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import models
from calm_jax.configs import AutoencoderConfig, ConfigError, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.models import layers, losses
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.backbone import init_cache
from calm_jax.models.calm import EnergyModel, sample_noise
from calm_jax.models.transformer import TransformerLM

V, K = 53, 4


@functools.lru_cache(maxsize=None)
def _jitted(module, method, static):
  return jax.jit(functools.partial(module.apply, method=method, **dict(static)))


def apply(module, params, *args, method=None, **kw):
  """``module.apply`` under jit (eager flax dispatches op by op, which is slow on a loaded CPU).
  Python scalars among the keyword arguments are bound statically."""
  static = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, (bool, int, str))))
  arrays = {k: v for k, v in kw.items() if not isinstance(v, (bool, int, str))}
  return _jitted(module, method, static)({"params": params}, *args, **arrays)


def _bb(**kw):
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
  base.update(kw)
  return LlamaConfig(**base)


AE = AutoencoderConfig(vocab_size=V, hidden_size=24, intermediate_size=40, latent_size=8, patch_size=K)
EN = EnergyConfig(backbone=_bb(), patch_size=K, latent_size=8, noise_size=6, num_mlp_layers=2, num_samples=4,
                  num_target_samples=10)
TR = TransformerConfig(backbone=_bb())


@pytest.fixture(scope="module")
def params():
  return {name: models.init_params(c, jax.random.key(i)) for i, (name, c) in
          enumerate((("ae", AE), ("en", EN), ("tr", TR)))}


def _perturbed(p, seed=0):
  """Parameters with every leaf moved off its initial value (zero-initialised layers included).
  Drawn on the host: a jitted per-leaf draw is a program of ~60 random loops to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), p)


def _tokens(b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def test_shapes_and_dtypes(params):
  toks = _tokens(2, 12)
  ae = Autoencoder(AE)
  mean, log_std = apply(ae, params["ae"], toks, method="encode")
  assert mean.shape == log_std.shape == (2, 3, 8)
  logits = apply(ae, params["ae"], mean, method="decode")
  assert logits.shape == (2, 3, K, V) and logits.dtype == jnp.float32
  noise = sample_noise(jax.random.key(1), (4, 2, 2), 6)
  assert float(noise.min()) >= -0.5 and float(noise.max()) <= 0.5
  preds = apply(EnergyModel(EN), params["en"], toks, noise)
  assert preds.shape == (4, 2, 2, 8)
  out, _ = apply(TransformerLM(TR), params["tr"], toks)
  assert out.shape == (2, 12, V) and out.dtype == jnp.float32
  for tree in params.values():
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))


def test_bf16_compute_keeps_fp32_params():
  cfg = EnergyConfig(backbone=_bb(dtype="bfloat16"), patch_size=K, latent_size=8, noise_size=6, num_mlp_layers=1)
  p = models.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  h, _ = apply(EnergyModel(cfg), p, _tokens(1, 8), method="hidden")
  assert h.dtype == jnp.bfloat16


def test_init_draws_like_post_init(params):
  # init_params draws same-shaped parameters as one stacked draw: every leaf must still be its
  # own sample (no two equal), N(0, 0.02^2) for weights, zero biases / zero-initialised last
  # layer, unit norm scales; the same key gives the same parameters, another key others.
  flat = jax.tree_util.tree_leaves_with_path(params["en"])
  weights = []
  for path, x in flat:
    name = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if name.endswith("['scale']"):
      np.testing.assert_array_equal(x, 1.0)
    elif name.endswith("['bias']") or "final_linear_1" in name:
      np.testing.assert_array_equal(x, 0.0)
    else:
      weights.append((name, x))
  assert len(weights) > 10
  for i, (name, x) in enumerate(weights):
    assert x.std() == pytest.approx(0.02, rel=0.25) and abs(x.mean()) < 0.01, name
    for other, y in weights[:i]:
      assert x.shape != y.shape or not np.allclose(x, y), (name, other)
  pooled = np.concatenate([x.ravel() for _, x in weights])
  assert pooled.std() == pytest.approx(0.02, rel=0.02)
  again = models.init_params(EN, jax.random.key(1))     # the fixture's key for 'en'
  other = models.init_params(EN, jax.random.key(7))
  for a, b, c in zip(jax.tree.leaves(params["en"]), jax.tree.leaves(again), jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)
    if float(jnp.std(a)) > 0:
      assert not np.allclose(a, c)


def test_logical_axes_cover_every_parameter():
  for cfg in (AE, EN, TR, EnergyConfig(backbone=_bb(scan_layers=True), latent_size=8, noise_size=6)):
    shapes = models.abstract_params(cfg)
    axes = models.logical_axes(cfg)
    for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
        axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
      assert len(spec) == x.ndim and all(isinstance(a, str) for a in spec), (path, spec)


def test_causality(params):
  p_en, p_tr = _perturbed(params["en"]), _perturbed(params["tr"])
  a, b = _tokens(1, 16, 0), _tokens(1, 16, 1)
  mixed = a.at[:, 8:].set(b[:, 8:])          # chunks 2, 3 changed
  h_a, _ = apply(EnergyModel(EN), p_en, a, method="hidden")
  h_m, _ = apply(EnergyModel(EN), p_en, mixed, method="hidden")
  np.testing.assert_allclose(h_a[:, :2], h_m[:, :2], atol=1e-6)
  assert float(jnp.max(jnp.abs(h_a[:, 2:] - h_m[:, 2:]))) > 1e-3
  l_a, _ = apply(TransformerLM(TR), p_tr, a)
  l_m, _ = apply(TransformerLM(TR), p_tr, mixed)
  np.testing.assert_allclose(l_a[:, :8], l_m[:, :8], atol=1e-5)
  assert float(jnp.max(jnp.abs(l_a[:, 8:] - l_m[:, 8:]))) > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_equals_full_forward(scan):
  cfg = TransformerConfig(backbone=_bb(scan_layers=scan))
  p = _perturbed(models.init_params(cfg, jax.random.key(5)))
  m = TransformerLM(cfg)
  toks = _tokens(2, 9, 3)
  full, _ = apply(m, p, toks)
  cache = init_cache(cfg.backbone, 2, 12)
  outs = []
  for lo, hi in ((0, 4), (4, 5), (5, 6), (6, 9)):   # a prefill, then single steps, then a block
    o, cache = apply(m, p, toks[:, lo:hi], cache=cache)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
  assert int(cache["index"]) == 9


def test_energy_kv_cache_and_left_padding(params):
  p = _perturbed(params["en"])
  m = EnergyModel(EN)
  toks = _tokens(1, 16, 7)
  full, _ = apply(m, p, toks, method="hidden")
  cache = init_cache(EN.backbone, 1, 6)
  inc = []
  for j in range(4):
    h, cache = apply(m, p, toks[:, 4 * j:4 * j + 4], cache=cache, method="hidden")
    inc.append(h)
  np.testing.assert_allclose(jnp.concatenate(inc, 1), full, atol=2e-5)
  # A row left-padded by two chunks (invalid slots, positions starting at 0 after the padding)
  # gives the same hidden states as the unpadded row.
  padded = jnp.concatenate([jnp.zeros((1, 8), jnp.int32), toks], 1)
  valid = jnp.array([[False, False, True, True, True, True]])
  positions = jnp.array([[0, 0, 0, 1, 2, 3]])
  cache = init_cache(EN.backbone, 1, 6)
  h_pad, _ = apply(m, p, padded, positions, cache, valid, method="hidden")
  np.testing.assert_allclose(h_pad[:, 2:], full, atol=2e-5)
  assert bool(jnp.all(jnp.isfinite(h_pad)))


def test_head_is_a_pure_function_of_hidden_and_noise(params):
  m = EnergyModel(EN)
  h = jax.random.normal(jax.random.key(0), (3, 32))
  n1, n2 = sample_noise(jax.random.key(1), (3,), 6), sample_noise(jax.random.key(2), (3,), 6)
  fresh = apply(m, params["en"], h, n1, method="head")
  np.testing.assert_array_equal(fresh, 0.0)          # zero-initialised last layer
  p = _perturbed(params["en"])
  a = apply(m, p, h, n1, method="head")
  np.testing.assert_array_equal(a, apply(m, p, h, n1, method="head"))
  assert float(jnp.max(jnp.abs(a - apply(m, p, h, n2, method="head")))) > 1e-4


def test_scan_and_remat_do_not_change_the_loss():
  toks = _tokens(2, 16, 4)
  ref = None
  # Same layout (no scan) so the initial parameters are identical; remat must not change numbers.
  for scan, remat in ((False, "none"), (False, "full"), (False, "dots")):
    cfg = TransformerConfig(backbone=_bb(scan_layers=scan, remat_policy=remat))
    p = models.init_params(cfg, jax.random.key(1))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: models.transformer_loss_fn(cfg, p, toks)[0]))(p)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
    if ref is None:
      ref = (loss, np.sort(flat))
    else:
      np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
      np.testing.assert_allclose(np.sort(flat), ref[1], atol=1e-5)


def test_energy_loss_trains_only_the_model(params):
  toks = _tokens(2, 16, 5)
  g_model, g_ae = jax.jit(jax.grad(
      lambda p, a: models.energy_loss_fn(EN, AE, p, a, toks, jax.random.key(0))[0], argnums=(0, 1)))(
          params["en"], params["ae"])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g_model))
  assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(g_model))
  assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(g_ae))   # frozen: stop_gradient


def test_autoencoder_train_mode_is_stochastic_and_eval_is_not(params):
  toks = _tokens(2, 8, 6)
  ae = Autoencoder(AE)
  a = apply(ae, params["ae"], toks)["logits"]
  np.testing.assert_array_equal(a, apply(ae, params["ae"], toks)["logits"])
  t1 = apply(ae, params["ae"], toks, key=jax.random.key(1), train=True)["logits"]
  t2 = apply(ae, params["ae"], toks, key=jax.random.key(2), train=True)["logits"]
  assert float(jnp.max(jnp.abs(t1 - t2))) > 0
  with pytest.raises(ValueError, match="PRNG key"):
    apply(ae, params["ae"], toks, train=True)


@pytest.mark.parametrize("bad, field", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(remat_policy="some"), "remat_policy"),
])
def test_bad_backbone_config_names_the_field(bad, field):
  with pytest.raises(ConfigError, match=field):
    _bb(**bad)


def test_config_from_dict_names_unknown_and_nested_fields():
  with pytest.raises(ConfigError, match=r"model\.backbone\.hiden_size"):
    EnergyConfig.from_dict({"backbone": {"hiden_size": 3}}, "model")
  with pytest.raises(ConfigError, match=r"model\.beta"):
    EnergyConfig.from_dict({"beta": 2.0}, "model")
  with pytest.raises(ConfigError, match="num_encoder_layers"):
    AutoencoderConfig(num_encoder_layers=3)
  assert EnergyConfig.from_dict(EN.to_dict()) == EN


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_logits_have_the_gradients_of_a_plain_product(dtype):
  """The autoencoder's tied output projection computes the embedding's gradient through explicit
  transposes (layers.tied_logits); its value and both gradients must be those of ``h @ E^T``, and
  Embed.attend must apply it over any leading axes."""
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(12, 5)), dtype)
  e = jnp.asarray(rng.normal(size=(37, 5)), dtype)
  c = jnp.asarray(rng.normal(size=(12, 37)), jnp.float32)

  def grads(f):
    return jax.jit(jax.value_and_grad(lambda h, e: jnp.sum(f(h, e).astype(jnp.float32) * c), argnums=(0, 1)))

  plain = lambda h, e: jax.lax.dot_general(h, e, (((1,), (1,)), ((), ())))
  (v0, (dh0, de0)), (v1, (dh1, de1)) = grads(plain)(h, e), grads(layers.tied_logits)(h, e)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  assert dh1.dtype == h.dtype and de1.dtype == e.dtype and de1.shape == e.shape
  np.testing.assert_allclose(v1, v0, rtol=tol)
  np.testing.assert_allclose(np.float32(dh1), np.float32(dh0), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.float32(de1), np.float32(de0), rtol=tol, atol=tol)

  h3 = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  e32 = jnp.float32(e)
  c3 = c.reshape(3, 4, 37)
  emb = layers.Embed(37, 5)
  got = jax.jit(jax.grad(lambda e: jnp.sum(emb.apply({"params": {"embedding": e}}, h3, method="attend") * c3)))(e32)
  want = jax.grad(lambda e: jnp.sum(jnp.einsum("btd,vd->btv", h3, e) * c3))(e32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_baseline_loss_equals_the_shifted_full_logits_loss(params):
  """The baseline's loss projects only the T - 1 predicting positions; it must equal the
  cross-entropy of the full model's logits shifted by one (value and every gradient, with and
  without a padding mask)."""
  p, tok = _perturbed(params["tr"], 3), _tokens(3, 16, 4)
  mask = jnp.ones(tok.shape, bool).at[1, 9:].set(False)

  def full(p, m):
    logits, _ = TransformerLM(TR).apply({"params": p}, tok)
    return losses.next_token_loss(logits, tok, m)

  def ours(p, m):
    return models.transformer_loss_fn(TR, p, tok, None, m)[0]

  for m in (None, mask):
    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(full))(p, m), jax.jit(jax.value_and_grad(ours))(p, m)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)
