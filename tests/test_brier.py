"""Tests for calm_jax.evaluation.brier: exact edge cases, reference slicing, and unbiasedness
of every estimator against the exact Brier-n of small Markov "models".

Seeds are fresh each run; statistical checks allow 5 standard errors, so a
correct estimator essentially never fails while a misaligned one (off-by-one
position, wrong prefix) is far outside.
"""

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.evaluation import brier

Z_MAX = 5.0


def fresh_seed():
  return secrets.randbelow(2**31)


def random_transition(rng, size, concentration=0.7):
  return rng.dirichlet(np.full(size, concentration), size=size)


def assert_close_in_se(estimates_RxPx4, exact_4, seed, label):
  """Row means are i.i.d. replicates; compare their mean with `exact` per n."""
  row_means_Rx4 = np.asarray(estimates_RxPx4, np.float64).mean(axis=1)
  mean_4 = row_means_Rx4.mean(0)
  se_4 = row_means_Rx4.std(0, ddof=1) / np.sqrt(row_means_Rx4.shape[0])
  # The floor covers float32 rounding where an estimate is deterministic (low-variance Brier-1).
  ok_4 = np.abs(mean_4 - exact_4) < Z_MAX * se_4 + 1e-5
  assert np.all(ok_4), f"{label} seed={seed} est={mean_4} exact={exact_4} se={se_4}"
  return row_means_Rx4


# ---------------------------------------------------------------------------
# Edge cases: perfect and hopeless samplers.
# ---------------------------------------------------------------------------


def test_perfect_sampler_scores_one():
  """K = 4, K = 6 and (with a perfect rollout) K = 2: every Brier-n is 1 and BrierLM 100."""
  rng = np.random.default_rng(fresh_seed())
  targets = [rng.integers(0, 50, (3, 7, k)) for k in (4, 6, 2)]

  @jax.jit
  def run(t4, t6, t2):
    return (brier.calm_brier(t4, t4, t4), brier.calm_brier(t6, t6, t6),
            brier.calm_brier(t2, t2, t2, jnp.ones((3, 5, 4), bool)))

  for b in run(*targets):
    assert b.shape[-1] == 4 and b.shape[1] in (7, 5)
    np.testing.assert_array_equal(np.asarray(b), 1.0)
    acc = brier.BrierAccumulator()
    acc.update(b)
    out = acc.result()
    assert out["brierlm"] == pytest.approx(100.0) and out["brier4"] == 1.0 and out["brier1_se"] == 0.0


def test_hopeless_sampler_scores_at_most_zero():
  target = np.random.default_rng(fresh_seed()).integers(0, 50, (3, 5, 4))
  run = jax.jit(lambda t: (brier.two_sample_brier(t + 1, t + 2, t), brier.two_sample_brier(t + 1, t + 1, t)))
  never_right, never_right_always_collide = run(target)
  np.testing.assert_array_equal(np.asarray(never_right), 0.0)
  np.testing.assert_array_equal(np.asarray(never_right_always_collide), -1.0)
  acc = brier.BrierAccumulator()
  acc.update(never_right)
  assert acc.result()["brierlm"] == 0.0 and acc.result()["at_chance"]
  assert float(brier.brierlm(np.array([0.5, 0.4, -0.1, 0.2]))) == 0.0
  # Four negative Brier-n: 0 and at chance; only the reference's formula (product clipped) gives 100.
  assert float(brier.brierlm(np.array([-1.0, -1.0, -1.0, -1.0]))) == 0.0
  assert float(brier.brierlm_reference(np.array([-1.0, -1.0, -1.0, -1.0]))) == pytest.approx(100.0)


def _summaries(values_BxPx4, block_length=16):
  """Every summary calm_jax prints or logs for one set of per-position Brier values:
  the accumulator, evaluate.format_brier's table, training's eval metrics as the
  quickstart prints them, and the frontier's reading of an eval JSON."""
  from calm_jax.evaluation import evaluate, frontier  # pylint: disable=import-outside-toplevel
  from launch import quickstart  # pylint: disable=import-outside-toplevel
  acc = brier.BrierAccumulator()
  acc.update(values_BxPx4)
  result = dict(acc.result(), estimator="calm", block_length=block_length)
  metrics = {f"eval/{k}": float(v) for k, v in result.items() if k != "estimator"}
  return result, evaluate.format_brier(result), quickstart._brier_line("CALM", metrics), \
      frontier.brier_fields(result)


def test_always_wrong_self_consistent_sampler_scores_zero_everywhere():
  """Two samples that always agree and are never right: Brier-n = -1 for every n.  The
  reference's formula gives 100; every summary of ours gives 0 and says "at chance"."""
  target = np.random.default_rng(fresh_seed()).integers(0, 50, (6, 5, 4))
  wrong = jax.jit(lambda t: brier.two_sample_brier(t + 1, t + 1, t))(target)
  result, table, line, fields = _summaries(wrong)
  assert result["brierlm"] == 0.0 and result["at_chance"] and result["brierlm_se"] == 0.0
  assert result["brierlm_reference"] == pytest.approx(100.0)
  assert [result[f"brier{n}"] for n in range(1, 5)] == [-1.0] * 4
  row = table.splitlines()[1]
  assert "  0.000 ± 0.000" in row and "at chance" in row and "T=16" in row and "ref 100.000" in row
  assert "BrierLM 0.00 ± 0.00" in line and "at chance" in line and "blocks of 16 tokens" in line
  assert "Brier-1 -100.00 ± 0.00" in line
  assert fields["value"] == 0.0 and fields["at_chance"] and fields["block_length"] == 16


def test_always_right_sampler_scores_hundred_everywhere():
  target = np.random.default_rng(fresh_seed()).integers(0, 50, (6, 5, 4))
  right = jax.jit(lambda t: brier.two_sample_brier(t, t, t))(target)
  result, table, line, fields = _summaries(right, block_length=20)
  assert result["brierlm"] == pytest.approx(100.0) and not result["at_chance"]
  assert result["brierlm_reference"] == pytest.approx(100.0)
  row = table.splitlines()[1]
  assert "100.000 ± 0.000" in row and "at chance" not in row and "T=20" in row
  assert "BrierLM 100.00" in line and "at chance" not in line
  assert fields["value"] == pytest.approx(100.0) and fields["at_chance"] is False


def test_mixed_signs_score_zero_and_at_chance():
  # Brier-1 and -2 positive, -3 and -4 negative: the product is positive (reference: > 0), ours 0.
  rng = np.random.default_rng(fresh_seed())
  values = np.broadcast_to(np.array([0.3, 0.1, -0.05, -0.02]), (8, 6, 4)) + rng.normal(0, 1e-3, (8, 6, 4))
  result, table, line, fields = _summaries(values)
  assert result["brier3"] < 0 and result["brier4"] < 0 and result["brier1"] > 0
  assert result["brierlm"] == 0.0 and result["at_chance"]
  assert result["brierlm_reference"] > 5.0
  assert "at chance" in table.splitlines()[1] and "at chance" in line and fields["value"] == 0.0
  for b in ([0.0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, -1e-9], [-0.1, 0.2, 0.3, 0.4]):
    assert float(brier.brierlm(np.array(b))) == 0.0 and bool(brier.at_chance(np.array(b))), b
  # Inside jit, batched over a leading axis.
  got = jax.jit(brier.brierlm)(jnp.array([[-1.0] * 4, [0.5, 0.4, 0.3, 0.2], [0.5, -0.4, 0.3, -0.2]]))
  np.testing.assert_allclose(np.asarray(got), [0.0, 100 * (0.5 * 0.4 * 0.3 * 0.2) ** 0.25, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Alignment with the reference's slicing.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chunk_windows_match_reference_slicing(k):
  steps = -(-4 // k)
  x = np.arange(2 * 9 * k).reshape(2, 9, k)
  # The reference: cat([x[:, i:-(steps - i), :] for i in range(steps)], -1).
  expected = np.concatenate([x[:, i:-(steps - i), :] for i in range(steps)], axis=-1)
  np.testing.assert_array_equal(np.asarray(brier.chunk_windows(jnp.asarray(x), steps)), expected)


def test_ar_accuracy_terms_match_reference_stacking():
  probs = np.random.default_rng(fresh_seed()).uniform(0.05, 1.0, (3, 11))
  stacked = np.stack((probs[:, :-3], probs[:, 1:-2], probs[:, 2:-1], probs[:, 3:]), axis=-1)
  expected = np.cumprod(stacked, axis=-1)
  got = brier.ar_accuracy_terms(jnp.log(jnp.asarray(probs, jnp.float32)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_ar_lowvar_masks_after_divergence():
  logp = jnp.log(jnp.full((1, 5), 0.5))
  same = jnp.array([[[True, False, True, True], [False, True, True, True]]])
  coll = jnp.array([[[0.3, 0.2, jnp.nan, jnp.inf], [0.3, jnp.nan, jnp.nan, jnp.nan]]])
  b = np.asarray(jax.jit(brier.ar_brier_lowvar)(logp, same, coll))
  acc = 2 * 0.5 ** np.arange(1, 5)
  np.testing.assert_allclose(b[0, 0], acc - [0.3, 0.2, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(b[0, 1], acc - [0.3, 0.0, 0.0, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Unbiasedness against exact Brier-n.
# ---------------------------------------------------------------------------


def exact_markov_brier(trans_VxV, context_P, target_Px4):
  """Exact Brier-1..4 of a token-level Markov chain from each context token."""
  sq_VxV = trans_VxV**2
  out = np.zeros((len(context_P), 4))
  for p, (ctx, ys) in enumerate(zip(context_P, target_Px4)):
    prob, prev, collision_V = 1.0, ctx, np.eye(len(trans_VxV))[ctx]
    for n in range(4):
      prob *= trans_VxV[prev, ys[n]]
      prev = ys[n]
      collision_V = collision_V @ sq_VxV
      out[p, n] = 2 * prob - collision_V.sum()
  return out


def test_ar_estimators_are_unbiased():
  """Bigram 'model': the plain and the reference (low-variance) estimators agree with the exact value."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  vocab, length, reps = 4, 10, 3000
  trans = random_transition(rng, vocab, concentration=0.5)
  tokens_T = rng.integers(0, vocab, length)
  log_trans = jnp.log(jnp.asarray(trans, jnp.float32))
  tf_logprobs_L = jnp.log(jnp.asarray(trans[tokens_T[:-1], tokens_T[1:]], jnp.float32))
  num_pos = length - 4  # positions i < seq_len - 4
  context_P = tokens_T[:num_pos]
  target_Px4 = np.stack([tokens_T[j + 1:j + 1 + num_pos] for j in range(4)], axis=-1)
  exact_4 = exact_markov_brier(trans, context_P, target_Px4).mean(0)

  def step_fn(state, tokens_B):
    return log_trans[tokens_B], state

  @jax.jit
  def estimates(key):
    key_roll, key_plain = jax.random.split(key)
    first_logits = jnp.tile(log_trans[context_P], (reps, 1))
    same, coll = brier.ar_rollout(step_fn, key_roll, first_logits, ())
    lowvar = brier.ar_brier_lowvar(jnp.tile(tf_logprobs_L, (reps, 1)), same.reshape(reps, num_pos, 4),
                                   coll.reshape(reps, num_pos, 4))

    # Plain: two independent 4-token continuations per (replicate, position).
    def continuation(k):
      prev = jnp.broadcast_to(jnp.asarray(context_P), (reps, num_pos))
      toks = []
      for j in range(4):
        prev = jax.random.categorical(jax.random.fold_in(k, j), log_trans[prev])
        toks.append(prev)
      return jnp.stack(toks, -1)

    k1, k2 = jax.random.split(key_plain)
    target = jnp.broadcast_to(jnp.asarray(target_Px4), (reps, num_pos, 4))
    plain = brier.two_sample_brier(continuation(k1), continuation(k2), target)
    return lowvar, plain

  lowvar, plain = estimates(jax.random.key(seed))
  rows_lowvar = assert_close_in_se(lowvar, exact_4, seed, "lowvar")
  rows_plain = assert_close_in_se(plain, exact_4, seed, "plain")
  # Rao-Blackwellising the accuracy term must reduce variance.
  assert np.all(rows_lowvar.var(0) < rows_plain.var(0)), seed
  np.testing.assert_allclose(rows_lowvar[:, 0], rows_lowvar[0, 0], rtol=1e-5)  # Brier-1 is exact
  # The accumulator's mean and jackknife error agree with the direct computation.
  acc = brier.BrierAccumulator()
  acc.update(lowvar[:reps // 2])
  acc.update(lowvar[reps // 2:])
  out = acc.result()
  np.testing.assert_allclose([out[f"brier{n}"] for n in range(1, 5)], rows_lowvar.mean(0), rtol=1e-6)
  np.testing.assert_allclose([out[f"brier{n}_se"] for n in range(1, 5)],
                             rows_lowvar.std(0, ddof=1) / np.sqrt(reps), rtol=1e-6, atol=1e-9)


def test_calm_small_k_estimator_is_unbiased():
  """K = 2 chunk-level Markov 'model': teacher-forced accuracy + rollout collisions match exact Brier-n."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  vocab, k, num_chunks, reps = 2, 2, 6, 3000
  num_values = vocab**k  # chunk value c <-> tokens (c // vocab, c % vocab)
  trans = random_transition(rng, num_values, concentration=0.5)
  log_trans = jnp.log(jnp.asarray(trans, jnp.float32))
  value_tokens = jnp.asarray([[c // vocab, c % vocab] for c in range(num_values)], jnp.int32)
  chunks_S = rng.integers(0, num_values, num_chunks)
  prev_S = np.concatenate([[0], chunks_S[:-1]])  # chunk p is predicted from chunk p-1 (chunk 0 from value 0)
  num_pos = num_chunks - 2  # S - ceil(4/K)

  # Exact Brier-n of the 4-token n-gram made of chunks p and p+1, given chunk p-1.
  tok = np.asarray(value_tokens)
  exact = np.zeros((num_pos, 4))
  for p in range(num_pos):
    pair = trans[prev_S[p]][:, None] * trans  # pair[c1, c2] = P(chunk p = c1, chunk p+1 = c2)
    grams = np.concatenate([np.repeat(tok, num_values, 0), np.tile(tok, (num_values, 1))], -1)  # [c1*V+c2, 4]
    probs = pair.reshape(-1)
    y = np.concatenate([tok[chunks_S[p]], tok[chunks_S[p + 1]]])
    for n in range(1, 5):
      keys = [tuple(g[:n]) for g in grams]
      marg = {}
      for key, pr in zip(keys, probs):
        marg[key] = marg.get(key, 0.0) + pr
      exact[p, n - 1] = 2 * marg.get(tuple(y[:n]), 0.0) - sum(v * v for v in marg.values())
  exact_4 = exact.mean(0)

  def step_fn(key, state, chunk_BxK):
    value_B = chunk_BxK[:, 0] * vocab + chunk_BxK[:, 1]
    pair = jax.random.categorical(key, log_trans[value_B], shape=(2,) + value_B.shape)
    return value_tokens[pair], state

  @jax.jit
  def estimates(key):
    key_tf, key_roll = jax.random.split(key)
    prev = jnp.broadcast_to(jnp.asarray(prev_S), (reps, num_chunks))
    samples = jax.random.categorical(key_tf, log_trans[prev], shape=(2, reps, num_chunks))
    pred1, pred2 = value_tokens[samples[0]], value_tokens[samples[1]]
    target = jnp.broadcast_to(value_tokens[jnp.asarray(chunks_S)], (reps, num_chunks, k))
    # Rollout from every start position p, starting with the teacher-forced samples at p.
    first1 = pred1[:, :num_pos].reshape(-1, k)
    first2 = pred2[:, :num_pos].reshape(-1, k)
    same = brier.calm_rollout_token_same(step_fn, key_roll, first1, first2, ())
    return brier.calm_brier(pred1, pred2, target, same.reshape(reps, num_pos, 4))

  est = estimates(jax.random.key(seed))
  assert est.shape == (reps, num_pos, 4)
  assert_close_in_se(est, exact_4, seed, "calm K=2")


def test_accumulator_masks_and_jackknife():
  rng = np.random.default_rng(fresh_seed())
  values = rng.uniform(-0.2, 1.0, (6, 5, 4))
  valid = rng.uniform(size=(6, 5)) > 0.3
  valid[:, 0] = True
  acc = brier.BrierAccumulator()
  acc.update(values[:2], valid[:2])
  acc.update(values[2:], valid[2:])
  out = acc.result()
  mean = values[valid].mean(0)
  np.testing.assert_allclose([out[f"brier{n}"] for n in range(1, 5)], mean)
  assert out["brierlm"] == pytest.approx(100 * np.prod(mean) ** 0.25)
  assert out["num_rows"] == 6 and out["num_positions"] == valid.sum()
  # Delete-one-row jackknife, written out.
  loo = np.array([values[np.arange(6) != r][valid[np.arange(6) != r]].mean(0) for r in range(6)])
  lm = 100 * np.prod(loo, axis=1) ** 0.25
  se_lm = np.sqrt(5 / 6 * np.sum((lm - lm.mean()) ** 2))
  assert out["brierlm_se"] == pytest.approx(se_lm)


def test_accumulator_rows_equal_positions():
  # The per-device BrierLM path hands over each row's sums; the result must be what the
  # per-position values give (means, jackknife errors, counts), dropped rows included.
  rng = np.random.default_rng(fresh_seed())
  values = rng.uniform(-0.2, 1.0, (5, 7, 4))
  row_mask = np.array([True, True, False, True, True])
  by_pos, by_row = brier.BrierAccumulator(), brier.BrierAccumulator()
  by_pos.update(values, np.broadcast_to(row_mask[:, None], (5, 7)))
  by_row.update_rows(values.sum(1), row_mask * 7.0)
  a, b = by_pos.result(), by_row.result()
  assert a.keys() == b.keys() and b["num_rows"] == 4 and b["num_positions"] == 28
  for name in a:
    assert b[name] == pytest.approx(a[name], rel=1e-12), name
