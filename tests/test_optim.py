"""Tests for calm_jax.training.optim: decay mask, clipping, schedules, accumulation, freezing."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax.training import optim


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Embed(11, 8, name="embed")(x)
    x = nn.RMSNorm(name="input_layernorm")(x)
    x = nn.Dense(8, use_bias=True, name="up")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(4, use_bias=False, name="down")(x)


def _params():
  # eval_shape traces flax's init without compiling it (slow on a shared CPU);
  # the values only need to be non-zero.
  shapes = jax.eval_shape(
    lambda k: _Block().init(k, jnp.zeros((2, 3), jnp.int32))["params"], jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


def _update(tx, grads, params, state=None):
  """One jitted optimizer update (eager optax dispatch is slow on a busy CPU)."""
  state = tx.init(params) if state is None else state
  return jax.jit(tx.update)(grads, state, params)


def test_decay_mask_excludes_norms_and_biases():
  mask = optim.decay_mask(_params())
  assert mask == {
    "embed": {"embedding": True},
    "input_layernorm": {"scale": False},
    "up": {"kernel": True, "bias": False},
    "ln_f": {"scale": False, "bias": False},
    "down": {"kernel": True},
  }


def test_decay_mask_looks_through_partitioned_boxes():
  kernel = nn.Partitioned(jnp.ones((2, 2)), names=("embed", "mlp"))
  scale = nn.Partitioned(jnp.ones((2,)), names=("norm",))
  mask = optim.decay_mask({"final_norm": {"scale": scale}, "proj": {"kernel": kernel}})
  leaves = dict(zip(["final_norm", "proj"], jax.tree.leaves(mask)))
  assert leaves == {"final_norm": False, "proj": True}


@pytest.mark.parametrize(
  "names,decayed",
  [
    (("decoder", "norm", "weight"), False),
    (("ln1", "w"), False),
    (("final_ln", "w"), False),
    (("mlp", "kernel"), True),
    (("tln", "kernel"), True),  # 'ln' only as a whole name component
    (("embed_tokens", "embedding"), True),
  ],
)
def test_is_decayed_rules(names, decayed):
  assert optim.is_decayed(names) is decayed


def test_weight_decay_applied_only_where_masked():
  # Zero gradients: Adam's update is 0, so the whole update is -lr * wd * param
  # where decay applies and exactly 0 elsewhere.
  cfg = optim.OptimConfig(learning_rate=0.5, weight_decay=0.1)
  params = _params()
  tx = optim.make_optimizer(cfg)
  updates, _ = _update(tx, jax.tree.map(jnp.zeros_like, params), params)
  np.testing.assert_allclose(updates["down"]["kernel"], -0.05 * params["down"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["embed"]["embedding"], -0.05 * params["embed"]["embedding"], rtol=1e-6)
  assert not np.any(updates["up"]["bias"]) and not np.any(updates["ln_f"]["scale"])
  assert not np.any(updates["input_layernorm"]["scale"])


def test_clipping_at_global_norm_one():
  clip = optax.clip_by_global_norm(optim.OptimConfig().grad_clip_norm)
  g = {"a": jnp.full((4,), 3.0), "b": jnp.full((9,), 4.0)}  # norm sqrt(36 + 144)
  clipped, _ = _update(clip, g, g)
  assert math.isclose(float(optax.global_norm(clipped)), 1.0, rel_tol=1e-6)
  small = {"a": jnp.full((4,), 0.1), "b": jnp.zeros((9,))}
  same, _ = _update(clip, small, small)
  np.testing.assert_array_equal(same["a"], small["a"])
  # The composed optimizer clips before Adam: its first moment after one step
  # is (1 - b1) * clipped gradient, of norm 0.1.
  tx = optim.make_optimizer(optim.OptimConfig(weight_decay=0.0))
  _, state = _update(tx, g, g)
  mu = state[1][0].mu
  assert math.isclose(float(optax.global_norm(mu)), 0.1, rel_tol=1e-5)


def test_schedules():
  lr = 3e-4
  const = optim.make_schedule(optim.OptimConfig(learning_rate=lr))
  assert float(const(0)) == pytest.approx(lr) and float(const(10**6)) == pytest.approx(lr)
  wc = optim.make_schedule(optim.OptimConfig(learning_rate=lr, schedule="warmup_constant", warmup_steps=100))
  assert float(wc(0)) == 0.0
  assert float(wc(50)) == pytest.approx(lr / 2)
  assert float(wc(100)) == pytest.approx(lr) and float(wc(5000)) == pytest.approx(lr)
  cos = optim.make_schedule(
    optim.OptimConfig(
      learning_rate=lr, schedule="warmup_cosine", warmup_steps=100, total_steps=1100, final_lr_fraction=0.1
    )
  )
  assert float(cos(50)) == pytest.approx(lr / 2)
  assert float(cos(100)) == pytest.approx(lr)
  # Halfway through the decay: end + (peak - end) / 2.
  assert float(cos(600)) == pytest.approx(0.1 * lr + 0.45 * lr, rel=1e-5)
  assert float(cos(1100)) == pytest.approx(0.1 * lr, rel=1e-5)
  assert float(cos(5000)) == pytest.approx(0.1 * lr, rel=1e-5)


@pytest.mark.parametrize(
  "kwargs,field",
  [
    ({"schedule": "linear"}, "schedule"),
    ({"warmup_steps": 1000}, "warmup_steps"),  # 'constant' + warmup: the reference's trap
    ({"schedule": "warmup_cosine", "warmup_steps": 10}, "total_steps"),
    ({"b2": 1.0}, "b2"),
    ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"mu_dtype": "float99"}, "mu_dtype"),
  ],
)
def test_config_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=f"OptimConfig.{field}"):
    optim.OptimConfig(**kwargs)


def _linear_loss(params, batch):
  pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])
  return jnp.mean((pred - batch["y"]) ** 2)


def _problem():
  rng = np.random.default_rng(1)
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  batch = {"x": f32(16, 5), "y": f32(16, 3)}
  params = {"w": f32(5, 3), "b": jnp.zeros((3,))}
  return params, batch


def test_accumulation_equals_big_batch():
  params, batch = _problem()
  loss, grads = jax.jit(jax.value_and_grad(_linear_loss))(params, batch)
  acc_loss, acc_grads = jax.jit(lambda p, b: optim.accumulate_gradients(_linear_loss, p, b, 4))(params, batch)
  np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
  for a, g in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(grads)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, g, rtol=1e-5, atol=1e-7)


def test_accumulation_aux_rng_and_bf16_params():
  params, batch = _problem()
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

  def loss_fn(p, b, rng):
    assert rng.dtype == jax.random.key(0).dtype
    loss = _linear_loss(p, b)
    return loss, {"loss": loss}

  (loss, aux), grads = jax.jit(
    lambda p, b, k: optim.accumulate_gradients(loss_fn, p, b, 2, rng=k, has_aux=True)
  )(params16, batch, jax.random.key(0))
  assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(aux["loss"], loss, rtol=1e-6)
  with pytest.raises(ValueError, match="not divisible"):
    optim.accumulate_gradients(_linear_loss, params, batch, 3)


def test_multisteps_accumulates():
  params, batch = _problem()
  tx = optim.make_optimizer(optim.OptimConfig(grad_accum_steps=2))
  g = jax.jit(jax.grad(_linear_loss))(params, batch)
  u1, state = _update(tx, g, params)
  assert all(not np.any(x) for x in jax.tree.leaves(u1))
  u2, state = _update(tx, g, params, state)
  assert any(np.any(x) for x in jax.tree.leaves(u2))


def test_frozen_parameters_do_not_move():
  params = _params()
  trainable = optim.path_mask(params, lambda names: names[0] != "embed")
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1), trainable=trainable)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = _update(tx, grads, params)
  assert not np.any(updates["embed"]["embedding"])
  assert np.all(updates["down"]["kernel"] != 0)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
