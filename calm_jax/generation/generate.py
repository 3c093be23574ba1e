"""Batched generation with a KV cache for CALM (K tokens a step) and the baseline (1 token a step).

Flow: pack the prompts (host) -> prefill the cache (one jitted call) -> a jitted
``lax.while_loop`` that samples, appends to the cache, and stops per row at EOS
and for all rows at ``max_new_tokens`` (or when every row is done).  The loop
runs ``steps_per_call`` steps per call so the host can show progress; the loop
state stays on the device between calls.

Ragged prompts.  Rows are right-aligned (left padding); whole padding slots are
masked out of attention with the cache's ``valid`` mask and every row gets its
own rotary positions (0 at its first real slot), so a row generates the same
as it would alone.  A CALM prompt whose length is not a multiple of K is padded
with PAD *inside its first chunk* (``prompt_padding='left'``, the default: the
generated text then continues right after the prompt's last real token) or, as
the reference's ``generate()``, at its end (``'end'``: the model then continues
after ``prompt PAD..PAD``).  PAD tokens never appear in the returned text.

Randomness.  Row ``b`` at step ``s`` draws from ``fold_in(fold_in(key, s),
row_ids[b])``, so a prompt's continuation does not depend on its batch
companions (at T = 1, and for the baseline at any T); ``row_ids`` default to
0..B-1.

Temperature.  CALM: ``calm_jax.generation.sampling.sample_chunk`` with ``method``
'rejection' (exact, T = 1/n), 'two_stage' (exact, any T in (0, 1]) or 'batch'
(the paper's approximation with ``num_candidates`` draws); rows where an exact
sampler hit ``max_attempts`` are counted in ``Generation.capped``.  Baseline:
softmax(logits / T), any T > 0 (``method`` is ignored).

Any generative head (``cfg.head``) samples through the same loop: a draw is the
head's sample from per-row noise (:func:`head_row_noise`), decoded and argmaxed.

Dimension legend: B batch rows, P padded prompt tokens, S prompt chunks (slots),
K tokens per chunk (1 for the baseline), D width, E noise size, V vocabulary,
N generated tokens (a multiple of K).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.generation import sampling
from calm_jax.models import heads
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.backbone import init_cache
from calm_jax.models.calm import EnergyModel, sample_noise
from calm_jax.models.transformer import TransformerLM

PROMPT_PADDINGS = ("left", "end")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """How to generate.

  max_new_tokens: tokens generated per row at most (CALM: rounded up to whole
    chunks on the device, cut back on the host).
  temperature, method, num_candidates, max_attempts: see the module docstring.
  prompt_padding: 'left' | 'end' (CALM prompts not a multiple of K).
  steps_per_call: loop steps per device call (0: all in one call).
  """
  max_new_tokens: int = 128
  temperature: float = 1.0
  method: str = "batch"
  num_candidates: int = 200
  max_attempts: int = 10_000
  prompt_padding: str = "left"
  steps_per_call: int = 0

  def validate(self, kind: str) -> None:
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}.")
    if self.prompt_padding not in PROMPT_PADDINGS:
      raise ValueError(f"prompt_padding must be one of {PROMPT_PADDINGS}; got {self.prompt_padding!r}.")
    if kind == "energy":
      sampling.validate_temperature(self.temperature, self.method)
      if self.method == "batch" and self.num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1; got {self.num_candidates}.")
    elif not self.temperature > 0:
      raise ValueError(f"Baseline temperature must be > 0; got T={self.temperature}.")


class PromptBatch(NamedTuple):
  """Right-aligned prompts: tokens_BxP (P = S*K), valid_BxS slots, positions_BxS, next_position_B."""
  tokens_BxP: np.ndarray
  valid_BxS: np.ndarray
  positions_BxS: np.ndarray
  next_position_B: np.ndarray


def pack_prompts(prompts: Sequence[Sequence[int]], patch_size: int, pad_id: int,
                 padding: str = "left", min_slots: int = 0) -> PromptBatch:
  """Pads each prompt to whole chunks and right-aligns the batch (see module docstring)."""
  if padding not in PROMPT_PADDINGS:
    raise ValueError(f"prompt_padding must be one of {PROMPT_PADDINGS}; got {padding!r}.")
  k = patch_size
  rows = []
  for i, p in enumerate(prompts):
    p = np.asarray(p, np.int32).reshape(-1)
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token.")
    fill = np.full((-p.size) % k, pad_id, np.int32)
    rows.append(np.concatenate([fill, p] if padding == "left" else [p, fill]))
  slots = max(max(r.size for r in rows) // k, min_slots)
  tokens = np.full((len(rows), slots * k), pad_id, np.int32)
  valid = np.zeros((len(rows), slots), bool)
  for b, r in enumerate(rows):
    tokens[b, tokens.shape[1] - r.size:] = r
    valid[b, slots - r.size // k:] = True
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
  return PromptBatch(tokens, valid, positions, valid.sum(1).astype(np.int32))


def row_noise(key: jax.Array, row_ids_B: jax.Array, n: int, noise_size: int) -> jax.Array:
  """Head noise [n, B, E]; row b's values depend only on (key, row_ids_B[b])."""
  noise_BxNxE = jax.vmap(lambda r: sample_noise(jax.random.fold_in(key, r), (n,), noise_size))(row_ids_B)
  return jnp.swapaxes(noise_BxNxE, 0, 1)


def head_row_noise(cfg, key: jax.Array, row_ids_B: jax.Array, n: int) -> jax.Array:
  """The head's noise ``[n, B, *noise_shape]`` (any head); row b's values depend only on
  ``(key, row_ids_B[b])``.  For the energy head: :func:`row_noise`."""
  head = heads.get(cfg)
  return heads.base.row_draws(key, row_ids_B, lambda k: head.noise(k, (n,)))


def calm_draw_fn(cfg, ae_cfg, params, ae_params, h_BxD, row_ids_B) -> sampling.DrawFn:
  """``draw(key, n) -> [n, B, K]``: n head samples per row (any head), decoded by the AE, argmax."""
  ae, head = Autoencoder(ae_cfg), heads.get(cfg)

  def draw(key, n):
    noise_NxBxE = head_row_noise(cfg, key, row_ids_B, n)
    z_NxBxL = head.sample(params["generative_head"], h_BxD[None], noise_NxBxE)
    return ae.apply({"params": ae_params}, z_NxBxL, method="decode_argmax").astype(jnp.int32)

  return draw


class DecodeState(NamedTuple):
  step: jax.Array          # int32 [], steps taken
  cache: Any
  last: jax.Array          # CALM: h_BxD of the last slot; baseline: logits_BxV
  position_B: jax.Array    # rotary position of the next slot
  out_BxN: jax.Array       # generated tokens (PAD after a row finished)
  done_B: jax.Array
  length_B: jax.Array      # tokens up to and including the first EOS
  capped_B: jax.Array      # exact-sampler draws that hit max_attempts


# ----------------------------------------------------------------------------- the model step


def _calm_fns(cfg, ae_cfg, settings: GenerationSettings):
  model = EnergyModel(cfg)

  def prefill(params, tokens_BxP, valid_BxS, positions_BxS, capacity):
    cache = init_cache(cfg.backbone, tokens_BxP.shape[0], capacity)
    h, cache = model.apply({"params": params}, tokens_BxP, positions_BxS, cache, valid_BxS, method="hidden")
    return h[:, -1], cache

  def sample(params, ae_params, last_BxD, key, row_ids_B):
    draw = calm_draw_fn(cfg, ae_cfg, params, ae_params, last_BxD, row_ids_B)
    res = sampling.sample_chunk(draw, key, settings.temperature, settings.method, settings.num_candidates,
                                settings.max_attempts)
    return res.chunks_BxK, ~res.accepted_B

  def feed(params, tokens_BxK, position_B, cache):
    h, cache = model.apply({"params": params}, tokens_BxK, position_B[:, None], cache, method="hidden")
    return h[:, 0], cache

  return prefill, sample, feed


def _baseline_fns(cfg, settings: GenerationSettings):
  model = TransformerLM(cfg)

  def prefill(params, tokens_BxP, valid_BxS, positions_BxS, capacity):
    cache = init_cache(cfg.backbone, tokens_BxP.shape[0], capacity)
    logits, cache = model.apply({"params": params}, tokens_BxP, positions_BxS, cache, valid_BxS)
    return logits[:, -1], cache

  def sample(params, ae_params, last_BxV, key, row_ids_B):
    del params, ae_params
    scaled = last_BxV.astype(jnp.float32) / settings.temperature
    tok_B = jax.vmap(lambda r, lg: jax.random.categorical(jax.random.fold_in(key, r), lg))(row_ids_B, scaled)
    return tok_B[:, None].astype(jnp.int32), jnp.zeros(tok_B.shape, bool)

  def feed(params, tokens_Bx1, position_B, cache):
    logits, cache = model.apply({"params": params}, tokens_Bx1, position_B[:, None], cache)
    return logits[:, 0], cache

  return prefill, sample, feed


def _decode_loop(sample: Callable, feed: Callable, k: int, eos_id: int, pad_id: int):
  """The jitted loop: ``run(params, ae_params, state, key, row_ids_B, stop_step) -> state``."""

  def run(params, ae_params, state: DecodeState, key, row_ids_B, stop_step):
    def cond(s: DecodeState):
      return (s.step < stop_step) & ~jnp.all(s.done_B)

    def body(s: DecodeState):
      chunk_BxK, capped_B = sample(params, ae_params, s.last, jax.random.fold_in(key, s.step), row_ids_B)
      chunk_BxK = jnp.where(s.done_B[:, None], pad_id, chunk_BxK)
      out = jax.lax.dynamic_update_slice(s.out_BxN, chunk_BxK, (0, s.step * k))
      is_eos_BxK = chunk_BxK == eos_id
      ends_B = jnp.any(is_eos_BxK, axis=-1) & ~s.done_B
      new_B = jnp.where(s.done_B, 0, jnp.where(ends_B, jnp.argmax(is_eos_BxK, axis=-1) + 1, k))
      last, cache = feed(params, chunk_BxK, s.position_B, s.cache)
      return DecodeState(s.step + 1, cache, last, s.position_B + 1, out, s.done_B | ends_B,
                         s.length_B + new_B, s.capped_B + (capped_B & ~s.done_B))

    return jax.lax.while_loop(cond, body, state)

  return run


# ----------------------------------------------------------------------------- the driver


class Generation(NamedTuple):
  """tokens: per row, the continuation (PAD removed, cut after the first EOS and at
  max_new_tokens); num_tokens: their total; seconds: decode wall time (prefill
  included, compilation excluded); compile_seconds: compilation plus one prefill; capped: per-row count of
  exact-sampler draws that hit max_attempts; lengths: per row, the positions generated before the
  cut (sampled PADs included, so ``len(tokens[b]) <= lengths[b]``)."""
  tokens: list
  num_tokens: int
  seconds: float
  compile_seconds: float
  capped: np.ndarray
  lengths: np.ndarray

  @property
  def tokens_per_sec(self) -> float:
    return self.num_tokens / max(self.seconds, 1e-9)


@functools.lru_cache(maxsize=16)
def _compiled_fns(kind, cfg, ae_cfg, sampler: tuple, eos_id, pad_id):
  """Jitted (prefill, loop, K); cached so repeated calls with new shapes only retrace."""
  temperature, method, num_candidates, max_attempts = sampler
  settings = GenerationSettings(temperature=temperature, method=method, num_candidates=num_candidates,
                                max_attempts=max_attempts)
  if kind == "energy":
    prefill, sample, feed = _calm_fns(cfg, ae_cfg, settings)
    k = cfg.patch_size
  elif kind == "transformer":
    prefill, sample, feed = _baseline_fns(cfg, settings)
    k = 1
  else:
    raise ValueError(f"generation needs an 'energy' or 'transformer' model; got kind={kind!r}.")
  loop = _decode_loop(sample, feed, k, eos_id, pad_id)
  return jax.jit(prefill, static_argnums=(4,)), jax.jit(loop, donate_argnums=(2,)), k


def generate(kind: str, cfg, params, prompts: Sequence[Sequence[int]], key: jax.Array,
             settings: GenerationSettings, *, eos_id: int, pad_id: int, ae_cfg=None, ae_params=None,
             row_ids: Sequence[int] | None = None, progress: Callable[[int, int], None] | None = None
             ) -> Generation:
  """Generates continuations of token-id prompts.

  Args:
    kind: 'energy' (CALM; needs ae_cfg / ae_params) or 'transformer'.
    cfg, params: the model.
    prompts: B non-empty token-id sequences (any lengths).
    key: PRNG key.
    settings: GenerationSettings.
    eos_id, pad_id: special ids.
    row_ids: per-row randomness ids (default 0..B-1).
    progress: called as ``progress(tokens_so_far, max_tokens)`` after every device call.

  Returns:
    a Generation.
  """
  settings.validate(kind)
  sampler = (float(settings.temperature), settings.method, settings.num_candidates, settings.max_attempts)
  if kind == "transformer":
    sampler = (float(settings.temperature), "", 0, 0)   # the baseline ignores the chunk sampler
  prefill, loop, k = _compiled_fns(kind, cfg, ae_cfg, sampler, int(eos_id), int(pad_id))
  batch = pack_prompts(prompts, k, pad_id, settings.prompt_padding if k > 1 else "left")
  b = len(prompts)
  steps = -(-settings.max_new_tokens // k)
  capacity = batch.valid_BxS.shape[1] + steps
  row_ids_B = jnp.asarray(np.arange(b) if row_ids is None else np.asarray(row_ids), jnp.int32)
  args = (params, jnp.asarray(batch.tokens_BxP), jnp.asarray(batch.valid_BxS), jnp.asarray(batch.positions_BxS))

  def start():
    last, cache = prefill(*args, capacity)
    return DecodeState(jnp.int32(0), cache, last, jnp.asarray(batch.next_position_B),
                       jnp.full((b, steps * k), pad_id, jnp.int32), jnp.zeros((b,), bool),
                       jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))

  # Compile (or fetch from jit's cache) outside the timed part: a call that stops at step 0.
  t0 = time.perf_counter()
  jax.block_until_ready(loop(params, ae_params, start(), key, row_ids_B, jnp.int32(0)))
  compile_seconds = time.perf_counter() - t0

  t0 = time.perf_counter()
  state = start()
  per_call = settings.steps_per_call or steps
  stop = 0
  while stop < steps:
    stop = min(stop + per_call, steps)
    state = loop(params, ae_params, state, key, row_ids_B, jnp.int32(stop))
    if progress is not None or stop < steps:
      done_all = bool(jnp.all(state.done_B))
      if progress is not None:
        progress(int(state.step) * k * b, steps * k * b)
      if done_all:
        break
  out = np.asarray(state.out_BxN)
  lengths = np.minimum(np.asarray(state.length_B), settings.max_new_tokens)
  seconds = time.perf_counter() - t0
  tokens = [row[:n][row[:n] != pad_id] for row, n in zip(out, lengths)]
  return Generation(tokens, int(sum(t.size for t in tokens)), seconds, compile_seconds,
                    np.asarray(state.capped_B), lengths)


def generate_text(trained, texts: Sequence[str], key: jax.Array, settings: GenerationSettings,
                  progress=None) -> tuple[list[str], Generation]:
  """Tokenises ``texts`` with the model's tokenizer, generates, and decodes the continuations."""
  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  if trained.tokenizer is None:
    raise ValueError("this model has no tokenizer (no tokenizer.json in its folder); pass token ids")
  eos_id, pad_id = loading.special_ids(trained)
  prompts = trained.tokenizer.encode_batch(list(texts))
  gen = generate(trained.kind, trained.cfg, trained.params, prompts, key, settings, eos_id=eos_id,
                 pad_id=pad_id, ae_cfg=trained.ae_cfg, ae_params=trained.ae_params, progress=progress)
  return [trained.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens], gen
