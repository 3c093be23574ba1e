"""Tests for calm_jax.generation.sampling: distributions checked against P^(1/T) by chi-square.

Seeds are fresh each run (printed on failure).  Thresholds are p > 1e-4 with a
few thousand samples: a correct sampler essentially never fails, while a wrong
one (e.g. P^n instead of P^(1/T), or untempered P) is rejected by a wide margin.
"""

import itertools
import math
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from calm_jax.generation import sampling

P_VALUE_MIN = 1e-4
PROBS = np.array([0.4, 0.3, 0.2, 0.1])
# Distinct chunks (K = 3) that share tokens, so equality must look at every position.
TABLE = np.array([[1, 2, 3], [1, 2, 4], [5, 2, 3], [0, 0, 0]], np.int32)


def make_draw(probs, table, batch):
  """draw(key, n) -> [n, batch, K]: i.i.d. chunks table[i] with probability probs[i]."""
  cdf_V = jnp.asarray(np.cumsum(probs)[:-1], jnp.float32)
  table = jnp.asarray(table)

  def draw(key, n):
    u_NxB = jax.random.uniform(key, (n, batch))
    return table[jnp.sum(u_NxB[..., None] >= cdf_V, axis=-1)]

  return draw


def histogram(chunks_BxK, table=TABLE):
  chunks_BxK = np.asarray(chunks_BxK)
  match_BxV = np.all(chunks_BxK[:, None, :] == table[None], axis=-1)
  assert np.all(match_BxV.sum(1) == 1), "sampler returned a chunk outside the support"
  return match_BxV.sum(0)


def tempered(probs, temperature):
  q = probs ** (1.0 / temperature)
  return q / q.sum()


def assert_chi_square(counts, expected_probs, seed):
  p = stats.chisquare(counts, counts.sum() * expected_probs).pvalue
  assert p > P_VALUE_MIN, f"seed={seed} counts={counts} expected={expected_probs} p={p:.2e}"


def fresh_seed():
  return secrets.randbelow(2**31)


def test_validate_temperature():
  assert sampling.validate_temperature(1.0, "rejection") == 1
  assert sampling.validate_temperature(0.5, "batch") == 2
  assert sampling.validate_temperature(1 / 3, "rejection") == 3
  assert sampling.validate_temperature(0.7, "two_stage") == 1
  assert sampling.validate_temperature(0.4, "two_stage") == 2
  for bad in (0.0, -0.5, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
      sampling.validate_temperature(bad, "two_stage")
  for method in ("rejection", "batch"):
    with pytest.raises(ValueError, match="1/2, 1/3"):
      sampling.validate_temperature(0.4, method)
  with pytest.raises(ValueError, match="Unknown sampling method"):
    sampling.validate_temperature(0.5, "nucleus")
  with pytest.raises(ValueError):
    sampling.sample_chunk(make_draw(PROBS, TABLE, 2), jax.random.key(0), 0.3, "batch")


@pytest.mark.parametrize("temperature", [0.5, 1 / 3])
def test_rejection_is_exact(temperature):
  seed, batch = fresh_seed(), 6000
  draw = make_draw(PROBS, TABLE, batch)
  fn = jax.jit(lambda key: sampling.sample_chunk(draw, key, temperature, "rejection"))
  res = fn(jax.random.key(seed))
  assert bool(jnp.all(res.accepted_B))
  assert_chi_square(histogram(res.chunks_BxK), tempered(PROBS, temperature), seed)
  # Attempts are geometric with success Z = sum P^n; each uses n draws.
  n = round(1 / temperature)
  z = np.sum(PROBS**n)
  attempts = np.asarray(res.attempts_B, np.float64)
  se = math.sqrt((1 - z) / z**2 / batch)
  assert abs(attempts.mean() - 1 / z) < 6 * se, (seed, attempts.mean(), 1 / z)
  np.testing.assert_array_equal(np.asarray(res.draws_B), n * np.asarray(res.attempts_B))


@pytest.mark.parametrize("temperature", [0.7, 0.4])
def test_two_stage_is_exact(temperature):
  seed, batch = fresh_seed(), 6000
  draw = make_draw(PROBS, TABLE, batch)
  fn = jax.jit(lambda key: sampling.sample_chunk(draw, key, temperature, "two_stage"))
  res = fn(jax.random.key(seed))
  assert bool(jnp.all(res.accepted_B))
  assert_chi_square(histogram(res.chunks_BxK), tempered(PROBS, temperature), seed)
  # Theorem 2: E[draws] = (n + sum_x P(x)^(1/T - 1)) / Z_T when alpha > 0.
  n = math.floor(1 / temperature)
  expected = (n + np.sum(PROBS ** (1 / temperature - 1))) / np.sum(PROBS ** (1 / temperature))
  draws = np.asarray(res.draws_B, np.float64)
  assert abs(draws.mean() - expected) < 6 * draws.std() / math.sqrt(batch), (seed, draws.mean(), expected)


def test_two_stage_reduces_to_rejection_and_single_draw():
  draw = make_draw(PROBS, TABLE, 64)

  @jax.jit
  def run(key):
    return (sampling.two_stage_sample(draw, key, 0.5), sampling.rejection_sample(draw, key, 2),
            sampling.sample_chunk(draw, key, 1.0, "two_stage"), draw(key, 1)[0])

  two_stage, rejection, at_one, single = run(jax.random.key(fresh_seed()))
  for a, b in zip(two_stage, rejection):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(at_one.chunks_BxK), np.asarray(single))
  assert np.all(np.asarray(at_one.draws_B) == 1) and bool(jnp.all(at_one.accepted_B))


def batch_algorithm_distribution(probs, num_candidates, n):
  """Exact output law of Algorithm 2 by enumerating all ordered candidate tuples."""
  out = np.zeros(len(probs))
  for combo in itertools.product(range(len(probs)), repeat=num_candidates):
    weight = np.prod(probs[list(combo)])
    counts = np.bincount(combo, minlength=len(probs))
    m = min(n, counts.max())
    w = np.array([math.comb(c, m) if c >= m else 0 for c in counts], np.float64)
    out += weight * w / w.sum()
  return out


def test_batch_matches_its_exact_law_and_converges():
  seed, batch, temperature = fresh_seed(), 2000, 0.5
  target = tempered(PROBS, temperature)
  draw = make_draw(PROBS, TABLE, batch)
  law_4 = batch_algorithm_distribution(PROBS, 4, 2)
  tv_4 = 0.5 * np.abs(law_4 - target).sum()

  @jax.jit
  def run(key):
    key_4, key_200 = jax.random.split(key)
    return (sampling.sample_chunk(draw, key_4, temperature, "batch", 4).chunks_BxK,
            sampling.sample_chunk(draw, key_200, temperature, "batch", 200).chunks_BxK)

  chunks_4, chunks_200 = run(jax.random.key(seed))
  # The vectorised sampler has exactly Algorithm 2's (biased) law at N = 4 ...
  counts_4 = histogram(chunks_4)
  assert_chi_square(counts_4, law_4, seed)
  # ... and at N = 200 is much closer to P^2 (the bias shrinks with N).
  counts_200 = histogram(chunks_200)
  tv_200 = 0.5 * np.abs(counts_200 / batch - target).sum()
  assert tv_4 > 0.05
  assert tv_200 < tv_4, (seed, tv_200, tv_4)
  assert_chi_square(counts_200, target, seed)
  # The N = 4 bias is large enough to be detected with these samples.
  assert stats.chisquare(counts_4, batch * target).pvalue < P_VALUE_MIN, seed


def test_batch_select_paper_example():
  """Paper §5.2: T = 1/2, {A,C,A,D,B,E,A,F,B,G} -> A with 3/4, B with 1/4."""
  seed, rows = fresh_seed(), 4000
  letters = np.array([0, 2, 0, 3, 1, 4, 0, 5, 1, 6], np.int32)
  cands = jnp.asarray(np.broadcast_to(np.stack([letters, letters * 7], -1), (rows, 10, 2)))

  @jax.jit
  def run(key):
    return (sampling.batch_select(key, cands, 2), sampling.batch_select(key, cands, 5),
            sampling.duplicate_counts(cands[:1]))

  (chunks, m), (chunks_5, m_5), counts = run(jax.random.key(seed))
  assert np.all(np.asarray(m) == 2)
  picked = np.asarray(chunks)[:, 0]
  assert set(np.unique(picked)) <= {0, 1}
  assert_chi_square(np.array([(picked == 0).sum(), (picked == 1).sum()]), np.array([0.75, 0.25]), seed)
  # n larger than any count falls back to the largest populated level (m = 3: only A).
  assert np.all(np.asarray(m_5) == 3) and np.all(np.asarray(chunks_5)[:, 0] == 0)
  np.testing.assert_array_equal(np.asarray(counts)[0], [3, 1, 3, 1, 2, 1, 3, 1, 2, 1])


def test_batch_at_temperature_one_is_a_single_draw():
  calls = []

  def draw(key, n):
    calls.append(n)
    return make_draw(PROBS, TABLE, 8)(key, n)

  res = jax.jit(lambda key: sampling.sample_chunk(draw, key, 1.0, "batch"))(jax.random.key(0))
  assert res.chunks_BxK.shape == (8, 3) and 200 not in calls


def test_cap_is_reported():
  """Chunks drawn uniformly from 1000^3 values almost never repeat: every row hits the cap."""
  batch = 16

  def draw(key, n):
    return jnp.floor(jax.random.uniform(key, (n, batch, 3)) * 1000).astype(jnp.int32)

  @jax.jit
  def run(key):
    return [sampling.sample_chunk(draw, key, t, m, max_attempts=40) for m, t in methods]

  methods = (("rejection", 0.5), ("two_stage", 0.4))
  for (method, _), res in zip(methods, run(jax.random.key(fresh_seed()))):
    assert not bool(jnp.any(res.accepted_B)), method
    assert np.all(np.asarray(res.attempts_B) == 40), (method, res.attempts_B)
    assert res.chunks_BxK.shape == (batch, 3)
    with pytest.warns(RuntimeWarning, match="16 of 16 rows hit max_attempts"):
      assert sampling.warn_if_capped(res, method) == batch
