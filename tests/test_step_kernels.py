"""The CALM step's cheaper pieces (issue 18 item 4): the paired-word normal generator, the energy
score's self-distance term with its own VJP, and the broadcast add whose VJP sums slices."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from calm_jax.models import layers, losses, rng
from test_sharding import ROOT, helper_env

_SHARDED_DRAWS = """
import os, re
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from calm_jax.models import losses
mesh = jax.make_mesh((8,), ("d",))
rows = NamedSharding(mesh, P("d", None))
mean = jax.device_put(jnp.zeros((64, 32)), rows)
f = jax.jit(lambda k, m: losses.posterior_samples(k, m, m, 16),
            out_shardings=NamedSharding(mesh, P(None, "d", None)))
text = f.lower(jax.random.key(0), mean).compile().as_text()
print("COLLECTIVES", len(re.findall(r"all-to-all|collective-permute|all-gather|all-reduce", text)))
"""

# ----------------------------------------------------------------------------- rng.normal


def test_normal_is_standard_normal_and_uncorrelated():
  x = np.asarray(rng.normal(jax.random.key(3), (64, 4096)), np.float64)
  assert x.shape == (64, 4096) and x.dtype == np.float64
  flat = x.ravel()
  n = flat.size
  assert abs(flat.mean()) < 5 / np.sqrt(n)
  assert abs(flat.std() - 1.0) < 5 * np.sqrt(0.5 / n)
  assert stats.kstest(flat, "norm").pvalue > 1e-3
  # The two words of one threefry block land in rows i and i + 32: they must be independent,
  # as must neighbours within a row.
  for a, b in [(x[:32].ravel(), x[32:].ravel()), (flat[:-1], flat[1:])]:
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)


def test_normal_is_a_function_of_key_and_shape():
  a = rng.normal(jax.random.key(0), (7, 5, 3))
  np.testing.assert_array_equal(a, rng.normal(jax.random.key(0), (7, 5, 3)))
  np.testing.assert_array_equal(a, jax.jit(lambda k: rng.normal(k, (7, 5, 3)))(jax.random.key(0)))
  assert not np.array_equal(a, rng.normal(jax.random.key(1), (7, 5, 3)))
  # Odd leading axis: no repeated values between the two halves.
  assert len(np.unique(np.asarray(a))) == a.size
  # Raw uint32 keys (jax.random.PRNGKey) take the same path as typed keys.
  np.testing.assert_array_equal(a, rng.normal(jax.random.key_data(jax.random.key(0)), (7, 5, 3)))


def test_normal_pairs_along_the_chosen_axis():
  a = np.asarray(rng.normal(jax.random.key(2), (6, 7, 4), axis=1))
  assert a.shape == (6, 7, 4) and len(np.unique(a)) == a.size
  # The same blocks as pairing along axis 0 of the transposed shape, joined along axis 1.
  b = np.asarray(rng.normal(jax.random.key(2), (7, 6, 4), axis=0))
  assert not np.array_equal(a, np.swapaxes(b, 0, 1))   # counters follow the given shape
  flat = rng.normal(jax.random.key(2), (5, 4000), axis=-1)
  assert abs(float(jnp.mean(flat))) < 5 / np.sqrt(flat.size)


def test_normal_under_vmap_matches_per_key_calls():
  keys = jax.random.split(jax.random.key(5), 3)
  batched = jax.vmap(lambda k: rng.normal(k, (4, 6)))(keys)
  for i in range(3):
    np.testing.assert_array_equal(batched[i], rng.normal(keys[i], (4, 6)))


def test_normal_other_key_impl_falls_back():
  key = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(rng.normal(key, (4, 3)), jax.random.normal(key, (4, 3)))


def test_posterior_draws_stay_on_their_devices():
  """Positions sharded over 8 devices: each device draws its own positions' samples, no collective
  (pairing the threefry words along the positions axis cost 30 all-to-alls here)."""
  proc = subprocess.run([sys.executable, "-c", _SHARDED_DRAWS], capture_output=True, text=True,
                        env=dict(helper_env(), JAX_PLATFORMS="cpu"), cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "COLLECTIVES 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_posterior_samples_have_the_posterior_moments():
  mean = jnp.array([[0.5, -2.0], [3.0, 0.0]])
  log_std = jnp.log(jnp.array([[0.1, 2.0], [1.0, 0.5]]))
  y = np.asarray(losses.posterior_samples(jax.random.key(0), mean, log_std, 20_000))
  assert y.shape == (20_000, 2, 2)
  np.testing.assert_allclose(y.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(y.std(0), np.exp(log_std), rtol=0.03)


# ----------------------------------------------------------------------------- self distances


@pytest.mark.parametrize("beta", [1.0, 0.5, 1.7])
def test_self_distance_pow_matches_autodiff(beta):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (5, 7, 3), jnp.float64)
    x = x.at[2].set(x[1])          # two equal samples: zero distances off the diagonal too
    g = jax.random.normal(jax.random.key(1), (5, 5, 7), jnp.float64)
    plain = lambda x: losses._safe_pow_norm(losses.pairwise_sq_dist_diff(x, x), beta)  # pylint: disable=protected-access
    ours = lambda x: losses.self_distance_pow(x, beta)
    np.testing.assert_array_equal(ours(x), plain(x))
    d_ours = jax.grad(lambda x: jnp.sum(g * ours(x)))(x)
    d_plain = jax.grad(lambda x: jnp.sum(g * plain(x)))(x)
    assert np.all(np.isfinite(d_ours))
    np.testing.assert_allclose(d_ours, d_plain, rtol=1e-12, atol=1e-12)


def test_energy_loss_gradient_matches_plain_formula():
  """The whole energy loss (both terms, gram cross term) against a direct formula (the loss
  computes in fp32)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, 6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (9, 6, 3), jnp.float64)

    def direct(x):
      dxx = jnp.sqrt(jnp.sum((x[:, None] - x[None]) ** 2, -1) + 1e-300) * (1 - jnp.eye(4))[..., None]
      dxy = jnp.sqrt(jnp.sum((x[:, None] - y[None]) ** 2, -1))
      return -jnp.mean(jnp.sum(dxx, (0, 1)) / 12 - 2 * jnp.mean(dxy, (0, 1)))

    for pairwise in ("diff", "gram"):
      f = lambda x, p=pairwise: losses.energy_loss(x, y, 1.0, None, p)
      np.testing.assert_allclose(f(x), direct(x), rtol=1e-6)
      np.testing.assert_allclose(jax.grad(f)(x), jax.grad(direct)(x), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- broadcast add


@pytest.mark.parametrize("a_shape,b_shape", [((8, 3, 4, 5), (3, 4, 5)), ((8, 3, 4, 5), (1, 3, 4, 5)),
                                             ((8, 3, 4, 5), (3, 1, 5)), ((70, 3, 5), (3, 5))])
def test_add_broadcast_gradients(a_shape, b_shape):
  a = jax.random.normal(jax.random.key(0), a_shape)
  b = jax.random.normal(jax.random.key(1), b_shape)
  g = jax.random.normal(jax.random.key(2), a_shape)
  np.testing.assert_array_equal(layers.add_broadcast(a, b), a + b)
  ours = jax.grad(lambda a, b: jnp.sum(g * layers.add_broadcast(a, b)), (0, 1))(a, b)
  plain = jax.grad(lambda a, b: jnp.sum(g * (a + b)), (0, 1))(a, b)
  assert ours[1].shape == b_shape
  np.testing.assert_allclose(ours[0], plain[0])
  np.testing.assert_allclose(ours[1], plain[1], rtol=1e-5, atol=1e-5)
