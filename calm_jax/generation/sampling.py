"""Likelihood-free temperature sampling of whole chunks (CALM paper §5, notes §5).

A CALM model has no tractable P(x) over a chunk x of K tokens; it can only
*draw* chunks.  Temperature T < 1 must therefore be reached from samples alone.
Everything here is model-independent: the model enters as a pure function

  draw(key, n) -> chunks_NxBxK  (int32)

returning n i.i.d. chunk samples for each of the B batch rows (in CALM one draw
is: energy-head sample, autoencoder decode, argmax).  `n` is always a Python
int, so `draw` may use it as a static shape.

Samplers (all jit-compatible, vectorised over B, no host round trips):

  * `rejection_sample` — exact at T = 1/n: accept when n draws are identical.
  * `two_stage_sample` — exact at any T in (0, 1]: Algorithm 1 (Stage 1 as above
    with n = floor(1/T), then a Bernoulli factory for P(x)^alpha, alpha = 1/T - n).
  * `batch_sample`     — Algorithm 2, the approximation used in practice (T = 1/n,
    N candidates, pick among the most-repeated values).
  * `sample_chunk`     — dispatcher over the three.

Exact samplers loop with `jax.lax.while_loop`, drawing a block of attempts per
iteration; rows that exhaust `max_attempts` are *reported* through the
`accepted` mask (their chunk is then an ordinary T = 1 draw), never hidden.

Dimension legend: B batch rows, K tokens per chunk, N candidates / draws,
A attempts per loop iteration, M Stage-2 draws per loop iteration.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

DrawFn = Callable[[jax.Array, int], jax.Array]

METHODS = ("rejection", "two_stage", "batch")
# 1/T within this distance of an integer counts as that integer.
_INT_TOL = 1e-6


class SampleResult(NamedTuple):
  """Output of every sampler.

  chunks_BxK:  the sampled chunk per row (int32).
  accepted_B:  True where the row's sample is a genuine draw from the target
               distribution; False where an exact sampler hit `max_attempts`
               (the chunk is then a plain T = 1 draw).  Always True for 'batch'.
  attempts_B:  Stage-1 attempts used (one attempt = n draws compared for
               equality, plus its Stage-2 draws if any).  1 for 'batch'.
  draws_B:     chunk samples consumed by the row's algorithm, the cost measure
               of the paper's Theorem 2 (N for 'batch').
  """
  chunks_BxK: jax.Array
  accepted_B: jax.Array
  attempts_B: jax.Array
  draws_B: jax.Array


def _inverse_temperature(temperature: float) -> tuple[int, float]:
  """Returns (n, alpha) with 1/T = n + alpha, snapping 1/T to an integer when close."""
  inv = 1.0 / temperature
  nearest = round(inv)
  if abs(inv - nearest) < _INT_TOL:
    return int(nearest), 0.0
  n = math.floor(inv)
  return n, inv - n


def validate_temperature(temperature: float, method: str = "two_stage") -> int:
  """Checks that `temperature` is usable by `method`; returns n = floor(1/T).

  Raises ValueError when T is outside (0, 1], when the method is unknown, or when
  the method is 'rejection' or 'batch' and 1/T is not an integer (within 1e-6).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; expected one of {METHODS}.")
  t = float(temperature)
  if not (0.0 < t <= 1.0) or math.isnan(t):
    raise ValueError(f"Temperature must lie in (0, 1]; got T={temperature}.")
  n, alpha = _inverse_temperature(t)
  if method in ("rejection", "batch") and alpha != 0.0:
    raise ValueError(
        f"Method {method!r} needs 1/T to be an integer (T = 1, 1/2, 1/3, 1/4, ...); got T={temperature} "
        f"(1/T = {1.0 / t:.6f}). Use method='two_stage' for arbitrary T in (0, 1].")
  return n


def _draw_spec(draw: DrawFn, key: jax.Array) -> tuple[int, int]:
  """(B, K) of the chunks `draw` returns, found without running it."""
  spec = jax.eval_shape(lambda k: draw(k, 1), key)
  if len(spec.shape) != 3 or spec.shape[0] != 1:
    raise ValueError(f"draw(key, n) must return [n, B, K]; got shape {spec.shape} for n=1.")
  return spec.shape[1], spec.shape[2]


def _all_identical(draws_NxBxK: jax.Array) -> jax.Array:
  """[..., N, B, K] -> [..., B]: whether all N draws of a row are the same chunk."""
  same_NxB = jnp.all(draws_NxBxK == draws_NxBxK[..., :1, :, :], axis=-1)
  return jnp.all(same_NxB, axis=-2)


def _first_true(mask_AxB: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Index of the first True along axis 0 per column, and whether there is one."""
  return jnp.argmax(mask_AxB, axis=0), jnp.any(mask_AxB, axis=0)


def _single_draw(draw: DrawFn, key: jax.Array) -> SampleResult:
  chunks_BxK = draw(key, 1)[0].astype(jnp.int32)
  ones_B = jnp.ones(chunks_BxK.shape[:1], jnp.int32)
  return SampleResult(chunks_BxK, ones_B.astype(bool), ones_B, ones_B)


def rejection_sample(draw: DrawFn, key: jax.Array, n: int, max_attempts: int = 10_000,
                     attempts_per_iter: int = 16) -> SampleResult:
  """Exact sampling from P^n / Z at T = 1/n.

  Each attempt draws n chunks for a row and accepts when all n are identical, so
  a value x is returned with probability proportional to P(x)^n.  Rows retry
  until accepted; every loop iteration runs `attempts_per_iter` attempts for all
  rows at once (rows already accepted ignore theirs).  The loop stops after
  ceil(max_attempts / attempts_per_iter) iterations; a row still unaccepted then
  has accepted=False and returns the first draw of its last attempt.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1; got {n}.")
  if n == 1:
    return _single_draw(draw, key)
  batch, chunk = _draw_spec(draw, key)
  num_iters = -(-max_attempts // attempts_per_iter)

  def body(carry):
    it, chunks_BxK, done_B, attempts_B = carry
    draws = draw(jax.random.fold_in(key, it), attempts_per_iter * n).astype(jnp.int32)
    draws_AxNxBxK = draws.reshape(attempts_per_iter, n, batch, chunk)
    # Attempts beyond the cap (in the last block) must not count as successes.
    attempt_idx_A = it * attempts_per_iter + jnp.arange(attempts_per_iter)
    success_AxB = _all_identical(draws_AxNxBxK) & (attempt_idx_A < max_attempts)[:, None]
    first_B, found_B = _first_true(success_AxB)
    firsts_AxBxK = draws_AxNxBxK[:, 0]
    new_B = found_B & ~done_B
    picked_BxK = jnp.take_along_axis(firsts_AxBxK, first_B[None, :, None], axis=0)[0]
    fallback_BxK = firsts_AxBxK[-1]
    chunks_BxK = jnp.where(new_B[:, None], picked_BxK, jnp.where(done_B[:, None], chunks_BxK, fallback_BxK))
    left = max_attempts - it * attempts_per_iter
    used_B = jnp.where(found_B, first_B + 1, jnp.minimum(attempts_per_iter, left))
    attempts_B = attempts_B + jnp.where(done_B, 0, used_B)
    return it + 1, chunks_BxK, done_B | found_B, attempts_B

  def cond(carry):
    it, _, done_B, _ = carry
    return (it < num_iters) & ~jnp.all(done_B)

  init = (jnp.int32(0), jnp.zeros((batch, chunk), jnp.int32), jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.int32))
  _, chunks_BxK, done_B, attempts_B = jax.lax.while_loop(cond, body, init)
  return SampleResult(chunks_BxK, done_B, attempts_B, attempts_B * n)


def two_stage_sample(draw: DrawFn, key: jax.Array, temperature: float, max_attempts: int = 10_000,
                     attempts_per_iter: int = 16, stage2_per_iter: int = 16) -> SampleResult:
  """Exact sampling from P^(1/T) / Z for any T in (0, 1] (paper Algorithm 1).

  With 1/T = n + alpha (0 <= alpha < 1): Stage 1 draws n chunks and restarts
  unless all agree, giving x* with probability P(x*)^n.  Stage 2 (a Bernoulli
  factory, Mendo 2019) uses *fresh* draws: for i = 1, 2, ...: draw x; if x == x*
  accept; else with probability alpha/i restart Stage 1.  It accepts with
  probability P(x*)^alpha, so the total is P(x*)^(1/T).  alpha = 0 reduces to
  `rejection_sample`.

  Vectorisation: each loop iteration, rows in Stage 1 run up to
  `attempts_per_iter` Stage-1 attempts (the first success moves the row to
  Stage 2), then every row in Stage 2 consumes up to `stage2_per_iter` fresh
  draws, stopping at its first accept or restart.  Rows finish at different
  iterations; the loop ends when all rows accepted, or after
  ceil(max_attempts / attempts_per_iter) iterations — remaining rows are
  reported with accepted=False (chunk = a plain draw).  Attempts are capped
  at max_attempts; a row whose Stage 2 is still running when the loop
  ends is also reported unaccepted.
  """
  validate_temperature(temperature, "two_stage")
  n, alpha = _inverse_temperature(float(temperature))
  if alpha == 0.0:
    return rejection_sample(draw, key, n, max_attempts, attempts_per_iter)
  batch, chunk = _draw_spec(draw, key)
  num_iters = -(-max_attempts // attempts_per_iter)
  num_a, num_m = attempts_per_iter, stage2_per_iter

  def body(carry):
    it, chunks_BxK, target_BxK, in_stage2_B, i_B, done_B, attempts_B, draws_B = carry
    key_it = jax.random.fold_in(key, it)
    key_s1, key_s2, key_u = jax.random.split(key_it, 3)
    fallback_BxK = chunks_BxK

    # Stage 1 for rows neither done nor in Stage 2.
    s1_B = ~done_B & ~in_stage2_B
    s1 = draw(key_s1, num_a * n).astype(jnp.int32).reshape(num_a, n, batch, chunk)
    attempt_idx_A = it * num_a + jnp.arange(num_a)
    success_AxB = _all_identical(s1) & (attempt_idx_A < max_attempts)[:, None]
    first_B, found_B = _first_true(success_AxB)
    star_BxK = jnp.take_along_axis(s1[:, 0], first_B[None, :, None], axis=0)[0]
    used_B = jnp.where(found_B, first_B + 1, jnp.minimum(num_a, max_attempts - it * num_a))
    attempts_B = attempts_B + jnp.where(s1_B, used_B, 0)
    draws_B = draws_B + jnp.where(s1_B, used_B * n, 0)
    enter_B = s1_B & found_B
    target_BxK = jnp.where(enter_B[:, None], star_BxK, target_BxK)
    i_B = jnp.where(enter_B, 1, i_B)
    in_stage2_B = in_stage2_B | enter_B
    # Plain draw kept as the answer of rows that end up capped.
    fallback_BxK = jnp.where(s1_B[:, None], s1[-1, 0], fallback_BxK)

    # Stage 2: draw m at index i_B + m; first event is an accept (match) or a restart.
    s2_MxBxK = draw(key_s2, num_m).astype(jnp.int32)
    u_MxB = jax.random.uniform(key_u, (num_m, batch))
    match_MxB = jnp.all(s2_MxBxK == target_BxK[None], axis=-1)
    index_MxB = i_B[None, :] + jnp.arange(num_m)[:, None]
    restart_MxB = ~match_MxB & (u_MxB < alpha / index_MxB)
    event_B, has_event_B = _first_true(match_MxB | restart_MxB)
    accept_B = in_stage2_B & has_event_B & jnp.take_along_axis(match_MxB, event_B[None], axis=0)[0]
    restart_B = in_stage2_B & has_event_B & ~accept_B
    draws_B = draws_B + jnp.where(in_stage2_B, jnp.where(has_event_B, event_B + 1, num_m), 0)
    i_B = jnp.where(in_stage2_B & ~has_event_B, i_B + num_m, i_B)

    kept_BxK = jnp.where(done_B[:, None], chunks_BxK, fallback_BxK)
    chunks_BxK = jnp.where(accept_B[:, None], target_BxK, kept_BxK)
    done_B = done_B | accept_B
    in_stage2_B = in_stage2_B & ~accept_B & ~restart_B
    return it + 1, chunks_BxK, target_BxK, in_stage2_B, i_B, done_B, attempts_B, draws_B

  def cond(carry):
    it, done_B = carry[0], carry[5]
    return (it < num_iters) & ~jnp.all(done_B)

  zeros_B = jnp.zeros((batch,), jnp.int32)
  zeros_BxK = jnp.zeros((batch, chunk), jnp.int32)
  false_B = jnp.zeros((batch,), bool)
  init = (jnp.int32(0), zeros_BxK, zeros_BxK, false_B, zeros_B, false_B, zeros_B, zeros_B)
  out = jax.lax.while_loop(cond, body, init)
  _, chunks_BxK, _, _, _, done_B, attempts_B, draws_B = out
  return SampleResult(chunks_BxK, done_B, attempts_B, draws_B)


def duplicate_counts(candidates_BxNxK: jax.Array) -> jax.Array:
  """c[b, i] = how many of row b's N candidates equal candidate i (itself included).

  An N x N equality table folded over K, so memory stays B x N x N.
  """
  eq_BxNxN = jnp.ones(candidates_BxNxK.shape[:2] + candidates_BxNxK.shape[1:2], bool)
  for k in range(candidates_BxNxK.shape[-1]):
    col_BxN = candidates_BxNxK[..., k]
    eq_BxNxN = eq_BxNxN & (col_BxN[:, :, None] == col_BxN[:, None, :])
  return jnp.sum(eq_BxNxN, axis=-1, dtype=jnp.int32)


def batch_select(key: jax.Array, candidates_BxNxK: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Algorithm 2's selection from given candidates; returns (chunks_BxK, m_B).

  m = the largest value <= n such that some candidate occurs at least m times
  (= min(n, max count)).  A distinct value x with count c_x >= m is chosen with
  probability proportional to C(c_x, m); we draw a candidate *index* i with
  weight C(c_i, m) / c_i, which sums to the same over x's c_x copies.
  """
  counts_BxN = duplicate_counts(candidates_BxNxK)
  m_B = jnp.minimum(n, jnp.max(counts_BxN, axis=-1))
  c = counts_BxN.astype(jnp.float32)
  m = m_B[:, None].astype(jnp.float32)
  # log C(c, m) - log c, in log space so large N and m stay finite.
  logw_BxN = gammaln(c + 1) - gammaln(m + 1) - gammaln(jnp.maximum(c - m, 0) + 1) - jnp.log(c)
  logw_BxN = jnp.where(counts_BxN >= m_B[:, None], logw_BxN, -jnp.inf)
  idx_B = jax.random.categorical(key, logw_BxN, axis=-1)
  chunks_BxK = jnp.take_along_axis(candidates_BxNxK, idx_B[:, None, None], axis=1)[:, 0]
  return chunks_BxK, m_B


def batch_sample(draw: DrawFn, key: jax.Array, n: int,
                 num_candidates: int = 200) -> tuple[jax.Array, jax.Array]:
  """Approximate T = 1/n sampling from `num_candidates` draws (paper Algorithm 2).

  Returns (chunks_BxK, m_B) where m_B is the level actually used (m_B < n means
  the row fell back because no value repeated n times).  Biased for finite N,
  asymptotically exact.  n = 1 (T = 1) uses a single draw, as the reference does.
  """
  if n == 1:
    return draw(key, 1)[0].astype(jnp.int32), jnp.ones(_draw_spec(draw, key)[:1], jnp.int32)
  key_draw, key_pick = jax.random.split(key)
  candidates_BxNxK = jnp.swapaxes(draw(key_draw, num_candidates).astype(jnp.int32), 0, 1)
  return batch_select(key_pick, candidates_BxNxK, n)


def sample_chunk(draw: DrawFn, key: jax.Array, temperature: float = 0.5, method: str = "batch",
                 num_candidates: int = 200, max_attempts: int = 10_000) -> SampleResult:
  """Samples one chunk per row at `temperature` with `method`; see module docstring.

  `temperature` and `method` are Python values (they fix shapes and loop
  structure): close over them before jitting.  For 'batch', accepted is all
  True, attempts is 1 and draws is num_candidates (1 at T = 1).
  """
  n = validate_temperature(temperature, method)
  if method == "rejection":
    return rejection_sample(draw, key, n, max_attempts)
  if method == "two_stage":
    return two_stage_sample(draw, key, temperature, max_attempts)
  chunks_BxK, _ = batch_sample(draw, key, n, num_candidates)
  ones_B = jnp.ones(chunks_BxK.shape[:1], jnp.int32)
  return SampleResult(chunks_BxK, ones_B.astype(bool), ones_B, ones_B * (num_candidates if n > 1 else 1))


def warn_if_capped(result: SampleResult, context: str = "") -> int:
  """Host-side check: warns when rows hit max_attempts; returns how many did.

  Call outside jit (it reads `accepted_B`).  Capped rows hold plain T = 1 draws,
  so their samples are not from the tempered distribution.
  """
  num_capped = int(jnp.sum(~result.accepted_B))
  if num_capped:
    where = f" ({context})" if context else ""
    warnings.warn(
        f"Temperature sampling{where}: {num_capped} of {result.accepted_B.shape[0]} rows hit max_attempts "
        "and returned an untempered draw; raise max_attempts or use method='batch'.", RuntimeWarning,
        stacklevel=2)
  return num_capped
