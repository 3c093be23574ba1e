"""BrierLM: a likelihood-free language-model metric (CALM paper §4, notes §4).

Brier(P, y) = 2 P(y) - sum_x P(x)^2 is strictly proper, and two model samples
x1, x2 ~ P give the unbiased estimate 1{x1=y} + 1{x2=y} - 1{x1=x2}.  Brier-n
treats the next n tokens as one outcome; BrierLM = 100 * (B1 B2 B3 B4)^(1/4),
reported as 0 ("at chance") when any Brier-n <= 0.

Every estimator here returns *per-position* values `brier_...x4` (last axis =
n - 1 for n = 1..4), so callers can average, mask and compute error bars.  The
reference averages them over batch and positions.

What is here, by model family:

  CALM, K >= 4      `two_sample_brier` on the first two head samples (decoded and
                    argmaxed) at chunk-aligned positions (reference `eval_brier`).
  CALM, K < 4       `calm_accuracy_terms` (teacher-forced samples concatenated over
                    ceil(4/K) chunks) + `calm_rollout_token_same` (collisions along
                    sample 1's path; the model enters as a step function) combined by
                    `calm_brier_from_rollout`.
  AR baseline       `two_sample_brier` on two independently sampled 4-token
                    continuations (plain), or `ar_brier_lowvar` (the reference
                    train_ar.py form: exact accuracy 2 prod P(y_j | y_<j) and
                    collision 1{first n-1 sampled tokens agreed} * sum_x P(x|prefix)^2)
                    fed by `ar_accuracy_terms` and `ar_rollout`.
  Aggregation       `brierlm` (0 when any Brier-n <= 0, `at_chance`), the
                    reference's `brierlm_reference` (product clipped), and
                    `BrierAccumulator` (means and jackknife errors over rows, i.e. eval blocks).

Dimension legend: B batch rows, S chunk (or token) positions, K chunk size,
P start positions evaluated, L teacher-forced predictions per row, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

MAX_N = 4  # Brier-1..4


def two_sample_brier(sample1_BxSxN: jax.Array, sample2_BxSxN: jax.Array,
                     target_BxSxN: jax.Array) -> jax.Array:
  """Plain two-sample Brier-1..4 per position: acc1 + acc2 - collision.

  The last axis holds the next N >= 4 tokens of each sample / target (for CALM
  with K >= 4: one decoded chunk, N = K).  Brier-n uses the first n: the indicator
  that n-grams agree is the cumulative product of per-token equalities.  Returns
  float32 [B, S, 4] with values in [-1, 2].  The two samples must be independent
  draws of the whole n-gram (not continuations of each other's prefixes).
  """
  if target_BxSxN.shape[-1] < MAX_N:
    raise ValueError(f"Need at least {MAX_N} tokens per position; got {target_BxSxN.shape[-1]}.")
  acc1 = jnp.cumprod((sample1_BxSxN == target_BxSxN).astype(jnp.float32), axis=-1)
  acc2 = jnp.cumprod((sample2_BxSxN == target_BxSxN).astype(jnp.float32), axis=-1)
  collision = jnp.cumprod((sample1_BxSxN == sample2_BxSxN).astype(jnp.float32), axis=-1)
  return (acc1 + acc2 - collision)[..., :MAX_N]


# ---------------------------------------------------------------------------
# CALM with K < 4: an n-gram spans ceil(4/K) chunks.
# ---------------------------------------------------------------------------


def num_chunks_to_cover(patch_size: int) -> int:
  """ceil(4 / K): chunks needed for a 4-token n-gram."""
  return math.ceil(MAX_N / patch_size)


def chunk_windows(x_BxSxK: jax.Array, num_steps: int) -> jax.Array:
  """Concatenates `num_steps` consecutive chunks: [B, S, K] -> [B, S - num_steps, num_steps*K].

  Window p holds chunks p, p+1, ..., p+num_steps-1.  Like the reference's
  `cat([x[:, i:-(num_steps - i)] for i in range(num_steps)], -1)`, the last chunk
  never starts or completes a window (P = S - num_steps, not S - num_steps + 1);
  this keeps the start positions aligned with the reference's rollout loop.
  """
  s = x_BxSxK.shape[1]
  if s <= num_steps:
    raise ValueError(f"Need more than {num_steps} chunk positions; got {s}.")
  parts = [x_BxSxK[:, i:s - (num_steps - i)] for i in range(num_steps)]
  return jnp.concatenate(parts, axis=-1)


def calm_accuracy_terms(pred1_BxSxK: jax.Array, pred2_BxSxK: jax.Array,
                        target_BxSxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Accuracy terms acc_j[b, p, n-1] = 1{first n tokens of sample j from chunk p are right}.

  Inputs are the teacher-forced samples (decoded + argmax) at every chunk
  position.  Concatenating samples from consecutive positions is valid because
  the cumulative product is already 0 once a token is wrong, and while all are
  right the teacher-forced context equals the ground truth.  Returns two float32
  [B, P, 4] arrays, P = S - ceil(4/K).
  """
  steps = num_chunks_to_cover(pred1_BxSxK.shape[-1])
  target_w = chunk_windows(target_BxSxK, steps)
  accs = []
  for pred in (pred1_BxSxK, pred2_BxSxK):
    eq = (chunk_windows(pred, steps) == target_w).astype(jnp.float32)
    accs.append(jnp.cumprod(eq, axis=-1)[..., :MAX_N])
  return accs[0], accs[1]


def calm_brier_from_rollout(acc1_BxPx4: jax.Array, acc2_BxPx4: jax.Array,
                            token_same_BxPx4: jax.Array) -> jax.Array:
  """Combines teacher-forced accuracy terms with rollout collision indicators.

  `token_same_BxPx4[b, p, t]` says whether token t (0-based, of the 4-token
  n-gram starting at chunk position p) was equal in the two rollout samples;
  entries after the two samples diverged may hold anything (the reference fills
  False) since the cumulative product masks them.  Returns float32 [B, P, 4].
  """
  collision = jnp.cumprod(token_same_BxPx4.astype(jnp.float32), axis=-1)
  return acc1_BxPx4 + acc2_BxPx4 - collision


CalmStepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def calm_rollout_token_same(step_fn: CalmStepFn, key: jax.Array, first1_BxK: jax.Array,
                            first2_BxK: jax.Array, state: Any) -> jax.Array:
  """Collision indicators for CALM with K < 4, rolled out along sample 1's path.

  first1_BxK, first2_BxK: the two teacher-forced samples at the start position
  (the chunks `calm_accuracy_terms` used there).  `step_fn(key, state, chunk_BxK)`
  feeds chunk_BxK to the model (e.g. appends it to a KV cache in `state`) and
  returns (two independent chunk samples for the next position [2, B, K], new
  state); `state` must keep fixed shapes.  Runs ceil(4/K) - 1 model steps,
  stopping early (as the reference does) once every row has diverged; rows that
  diverged get False for later tokens.  Returns bool [B, 4].

  To evaluate all start positions at once, fold them into B (the reference loops
  over positions, each with batch B).
  """
  batch, k = first1_BxK.shape
  steps = num_chunks_to_cover(k)
  eq_BxK = first1_BxK == first2_BxK
  same_BxT = jnp.zeros((batch, steps * k), bool).at[:, :k].set(eq_BxK)

  def cond(carry):
    j, _, _, _, prefix_same_B = carry
    return (j < steps) & jnp.any(prefix_same_B)

  def body(carry):
    j, state, current_BxK, same_BxT, prefix_same_B = carry
    pair_2xBxK, state = step_fn(jax.random.fold_in(key, j), state, current_BxK)
    eq_BxK = pair_2xBxK[0] == pair_2xBxK[1]
    same_BxT = jax.lax.dynamic_update_slice(same_BxT, eq_BxK, (0, j * k))
    prefix_same_B = prefix_same_B & jnp.all(eq_BxK, axis=-1)
    return j + 1, state, pair_2xBxK[0].astype(current_BxK.dtype), same_BxT, prefix_same_B

  init = (jnp.int32(1), state, first1_BxK, same_BxT, jnp.all(eq_BxK, axis=-1))
  _, _, _, same_BxT, _ = jax.lax.while_loop(cond, body, init)
  return same_BxT[:, :MAX_N]


def calm_brier(pred1_BxSxK: jax.Array, pred2_BxSxK: jax.Array, target_BxSxK: jax.Array,
               token_same_BxPx4: jax.Array | None = None) -> jax.Array:
  """Per-position CALM Brier-1..4, following the reference's two cases.

  K >= 4: `two_sample_brier` over all S chunk positions ([B, S, 4]).
  K < 4: needs `token_same_BxPx4` from `calm_rollout_token_same` for each of the
  P = S - ceil(4/K) start positions; returns [B, P, 4].
  """
  if pred1_BxSxK.shape[-1] >= MAX_N:
    return two_sample_brier(pred1_BxSxK, pred2_BxSxK, target_BxSxK)
  if token_same_BxPx4 is None:
    raise ValueError("CALM with K < 4 needs token_same_BxPx4 from an autoregressive rollout.")
  acc1, acc2 = calm_accuracy_terms(pred1_BxSxK, pred2_BxSxK, target_BxSxK)
  return calm_brier_from_rollout(acc1, acc2, token_same_BxPx4)


# ---------------------------------------------------------------------------
# Discrete (AR) baseline, lower-variance form of the reference's train_ar.py.
# ---------------------------------------------------------------------------


def collision_probability(logits_xV: jax.Array) -> jax.Array:
  """sum_x P(x)^2 of softmax(logits) over the last axis, in float32."""
  probs = jax.nn.softmax(logits_xV.astype(jnp.float32), axis=-1)
  return jnp.sum(probs * probs, axis=-1)


def ar_accuracy_terms(target_logprobs_BxL: jax.Array) -> jax.Array:
  """Exact n-gram accuracy prod_{j<n} P(y_{t+j} | y_<t+j) per start position.

  target_logprobs_BxL[b, t] = log P(y_{t+1} | y_{<=t}) from a teacher-forced pass
  (logits[:, :-1] against labels[:, 1:], as the reference shifts them).  Returns
  float32 [B, L-3, 4]: start positions t = 0..L-4, i.e. every token position
  i < seq_len - 4 of the reference.  Summing log-probs before exp is the
  reference's cumprod of probabilities, without underflow worries.
  """
  lp = target_logprobs_BxL.astype(jnp.float32)
  length = lp.shape[1]
  if length < MAX_N:
    raise ValueError(f"Need at least {MAX_N} predictions per row; got {length}.")
  stacked_BxPx4 = jnp.stack([lp[:, j:length - (MAX_N - 1) + j] for j in range(MAX_N)], axis=-1)
  return jnp.exp(jnp.cumsum(stacked_BxPx4, axis=-1))


def ar_brier_lowvar(target_logprobs_BxL: jax.Array, token_same_BxPx4: jax.Array,
                    collision_prob_BxPx4: jax.Array) -> jax.Array:
  """The reference train_ar.py estimator: 2 prod P(y) - 1{prefix agreed} sum_x P(x|prefix)^2.

  token_same_BxPx4[b, p, j]: whether the two samples drawn at rollout step j
  agreed (only j < 3 matter).  collision_prob_BxPx4[b, p, j]: sum_x P(x | context,
  sample-1 tokens 0..j-1)^2 at step j.  Both come from `ar_rollout` started at
  position p (P = L - 3 positions, matching `ar_accuracy_terms`).  Brier-n uses
  1{tokens 0..n-2 agreed} * collision_prob[n-1], an unbiased estimate of
  sum over n-grams of P(g)^2.  Entries after divergence may hold anything,
  including NaN.  Returns float32 [B, P, 4].
  """
  acc_BxPx4 = ar_accuracy_terms(target_logprobs_BxL)
  same = token_same_BxPx4.astype(jnp.float32)
  prefix_same = jnp.cumprod(jnp.concatenate([jnp.ones_like(same[..., :1]), same[..., :MAX_N - 1]], -1), -1)
  collision = jnp.where(prefix_same > 0, collision_prob_BxPx4.astype(jnp.float32), 0.0)
  return 2.0 * acc_BxPx4 - collision


ArStepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def ar_rollout(step_fn: ArStepFn, key: jax.Array, first_logits_BxV: jax.Array,
               state: Any) -> tuple[jax.Array, jax.Array]:
  """Rollout quantities for `ar_brier_lowvar`, along sample 1's path.

  first_logits_BxV: teacher-forced logits at the start position (predicting
  its next token).  `step_fn(state, tokens_B)` feeds tokens_B and returns (the
  next logits [B, V], new state) with fixed-shape state.  At each of 4 steps two
  tokens are drawn at T = 1 (with replacement) and the exact collision
  probability recorded; sample 1 is fed back.  Stops early once every row has
  diverged (later entries: token_same False, collision_prob 0), as the reference.
  Returns (token_same bool [B, 4], collision_prob float32 [B, 4]).
  """
  batch = first_logits_BxV.shape[0]

  def sample(j, logits_BxV):
    toks_2xB = jax.random.categorical(jax.random.fold_in(key, j), logits_BxV.astype(jnp.float32),
                                      shape=(2, batch))
    return toks_2xB, collision_probability(logits_BxV)

  toks_2xB, coll_B = sample(0, first_logits_BxV)
  same_Bx4 = jnp.zeros((batch, MAX_N), bool).at[:, 0].set(toks_2xB[0] == toks_2xB[1])
  coll_Bx4 = jnp.zeros((batch, MAX_N), jnp.float32).at[:, 0].set(coll_B)

  def cond(carry):
    j, _, _, _, _, prefix_same_B = carry
    return (j < MAX_N) & jnp.any(prefix_same_B)

  def body(carry):
    j, state, tokens_B, same_Bx4, coll_Bx4, prefix_same_B = carry
    logits_BxV, state = step_fn(state, tokens_B)
    toks_2xB, coll_B = sample(j, logits_BxV)
    same_Bx4 = same_Bx4.at[:, j].set(toks_2xB[0] == toks_2xB[1])
    coll_Bx4 = coll_Bx4.at[:, j].set(coll_B)
    return j + 1, state, toks_2xB[0], same_Bx4, coll_Bx4, prefix_same_B & (toks_2xB[0] == toks_2xB[1])

  init = (jnp.int32(1), state, toks_2xB[0], same_Bx4, coll_Bx4, toks_2xB[0] == toks_2xB[1])
  _, _, _, same_Bx4, coll_Bx4, _ = jax.lax.while_loop(cond, body, init)
  return same_Bx4, coll_Bx4


# ---------------------------------------------------------------------------
# Aggregation.
# ---------------------------------------------------------------------------


def at_chance(brier_n_means) -> Any:
  """True where some Brier-n mean (last axis, n = 1..4) is <= 0: the model is no better than chance.

  Brier-n > 0 means the model puts more mass on the true n-gram than a sampler whose
  two draws agree with each other by chance; at <= 0 the geometric mean of the four is
  undefined (or meaningless), so :func:`brierlm` reports 0 there.
  """
  xp = jnp if isinstance(brier_n_means, jax.Array) else np
  return xp.any(xp.asarray(brier_n_means)[..., :MAX_N] <= 0, axis=-1)


def brierlm(brier_n_means) -> Any:
  """BrierLM = 100 * (B1 B2 B3 B4)^(1/4) from the four Brier-n means (last axis); 0 if any B_n <= 0.

  This is the headline number everywhere calm_jax reports BrierLM.  Unlike the
  reference (:func:`brierlm_reference`, which clips only the product), a sampler that
  is never right but always agrees with itself (every Brier-n = -1) scores 0, not 100.
  Both definitions agree whenever every Brier-n is positive, i.e. for every model that
  has learned something, so comparisons with the paper's numbers are unaffected.
  """
  # numpy in, numpy out (host-side reporting); jax in, jax out (inside jit).
  xp = jnp if isinstance(brier_n_means, jax.Array) else np
  b = xp.asarray(brier_n_means)[..., :MAX_N]
  ok = ~at_chance(b)
  prod = xp.prod(xp.where(ok[..., None], b, 1.0), axis=-1)
  return xp.where(ok, 100.0 * prod ** 0.25, 0.0)


def brierlm_reference(brier_n_means) -> Any:
  """The reference's formula, 100 * max(B1 B2 B3 B4, 0)^(1/4), for comparison with the authors' numbers.

  Only the product is clipped, so an even number of negative Brier-n gives a positive
  score (a never-right, always-colliding sampler scores 100).  Report :func:`brierlm`.
  """
  xp = jnp if isinstance(brier_n_means, jax.Array) else np
  b = xp.asarray(brier_n_means)
  return 100.0 * xp.maximum(xp.prod(b[..., :MAX_N], axis=-1), 0.0) ** 0.25


class BrierAccumulator:
  """Gathers per-position Brier-1..4 over eval batches; reports means and errors.

  Means are over all valid positions (equal to the reference's mean of batch
  means when every batch has the same shape).  Standard errors use the
  delete-one-row jackknife with each row (eval block, i.e. document chunk) as
  the independent unit: positions within a row share context and overlapping
  n-grams, so treating them as independent would understate the error.  For the
  Brier-n means this equals the standard error of row means when rows are
  equally long; for BrierLM it is the jackknife of the nonlinear statistic.
  Host-side (numpy float64); call `update` with device arrays, outside jit.
  """

  def __init__(self):
    self._sums: list[np.ndarray] = []
    self._counts: list[np.ndarray] = []

  def update(self, brier_BxPx4, valid_BxP=None) -> None:
    """Adds one batch; `valid_BxP` (optional bool) masks out positions."""
    values = np.asarray(brier_BxPx4, np.float64)[..., :MAX_N]
    values = values.reshape(values.shape[0], -1, MAX_N)
    valid = np.ones(values.shape[:2], bool) if valid_BxP is None else np.asarray(valid_BxP, bool)
    valid = valid.reshape(values.shape[:2])
    self._sums.append(np.sum(np.where(valid[..., None], values, 0.0), axis=1))
    self._counts.append(valid.sum(axis=1).astype(np.float64))

  def update_rows(self, sums_Bx4, counts_B) -> None:
    """Adds rows already summed over their positions (``counts_B`` valid positions each;
    0 drops a row), as the per-device BrierLM functions return them."""
    self._sums.append(np.asarray(sums_Bx4, np.float64)[:, :MAX_N])
    self._counts.append(np.asarray(counts_B, np.float64))

  def result(self) -> dict[str, Any]:
    """brier1..4, brierlm, brierlm_reference, their `_se`, at_chance, num_rows and num_positions.

    ``brierlm`` is 0 and ``at_chance`` True when any Brier-n mean is <= 0; its
    jackknife error is that of the clipped statistic (0 when every leave-one-out
    estimate is at chance too).
    """
    if not self._sums:
      raise ValueError("BrierAccumulator.result() called before any update().")
    sums_Rx4 = np.concatenate(self._sums)
    counts_R = np.concatenate(self._counts)
    keep = counts_R > 0
    sums_Rx4, counts_R = sums_Rx4[keep], counts_R[keep]
    total_4, count = sums_Rx4.sum(0), counts_R.sum()
    means_4 = total_4 / count
    out: dict[str, Any] = {f"brier{n + 1}": float(means_4[n]) for n in range(MAX_N)}
    out["brierlm"] = float(brierlm(means_4))
    out["brierlm_reference"] = float(brierlm_reference(means_4))
    out["at_chance"] = bool(at_chance(means_4))
    rows = len(counts_R)
    if rows > 1:
      loo_Rx4 = (total_4[None] - sums_Rx4) / (count - counts_R)[:, None]
      stats_RxM = np.concatenate([loo_Rx4, brierlm(loo_Rx4)[:, None], brierlm_reference(loo_Rx4)[:, None]],
                                 axis=1)
      dev = stats_RxM - stats_RxM.mean(0)
      se_M = np.sqrt((rows - 1) / rows * np.sum(dev * dev, axis=0))
    else:
      se_M = np.full(MAX_N + 2, np.nan)
    for n in range(MAX_N):
      out[f"brier{n + 1}_se"] = float(se_M[n])
    out["brierlm_se"] = float(se_M[MAX_N])
    out["brierlm_reference_se"] = float(se_M[MAX_N + 1])
    out["num_rows"] = rows
    out["num_positions"] = int(count)
    return out
