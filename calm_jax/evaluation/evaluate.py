"""BrierLM of CALM and the baseline on eval blocks, and the autoencoder's robustness.

The per-position estimators live in :mod:`calm_jax.evaluation.brier`; this module runs the
models that feed them, all jitted once per block shape:

  CALM, K >= 4   one teacher-forced pass; the first two head samples at each chunk
                 position, decoded by the AE and argmaxed (reference ``eval_brier``).
  CALM, K < 4    the same pass, with a KV cache, gives the accuracy terms; the
                 collision term rolls sample 1 forward (``brier.calm_rollout_token_same``).
  Baseline       'lowvar' (the reference's train_ar.py form, ``brier.ar_rollout``)
                 and/or 'plain' (two independently sampled 4-token continuations).

Rollouts never loop over positions in Python: start positions are folded into
the batch as extra rows, ``rollout_rows`` rows at a time (a ``lax.map`` over
blocks of start positions).  Each row holds a copy of its block's KV cache whose
``valid`` mask keeps only the slots at or before its start position, so every
row sees exactly its prefix; the rollout's own slots are appended after the
teacher-forced ones with per-row rotary positions.  Blocks stop early once all
their rows have diverged.  Memory per block is ``rollout_rows`` x the cache of
one eval block; ``rollout_rows=0`` sizes it from ``rollout_memory_gb``.

Randomness: CALM rollout noise for start position p, batch row b, step j is
``row_noise(fold_in(key, j), p * B + b)`` (independent of the blocking).

Dimension legend: B batch rows (eval blocks), T tokens per block, K chunk size,
S chunks per block, P start positions, R rollout rows (= start positions x B),
C cache slots, V vocabulary, L latent, M noise levels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.configs import dtype_of
from calm_jax.evaluation import brier
from calm_jax.generation.generate import head_row_noise
from calm_jax.models import heads
from calm_jax.models.autoencoder import Autoencoder
from calm_jax.models.backbone import init_cache
from calm_jax.models.calm import EnergyModel
from calm_jax.models.transformer import TransformerLM
from calm_jax.parallel import sharded_losses
from calm_jax.parallel.sharding import BATCH_AXES, batch_divisor, put_batch

ESTIMATORS = ("lowvar", "plain", "both")
AE_SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5)


@dataclasses.dataclass(frozen=True)
class BrierSettings:
  """estimator: baseline only, 'lowvar' | 'plain' | 'both'.  rollout_rows: rows per
  rollout block (0: from rollout_memory_gb)."""
  estimator: str = "lowvar"
  rollout_rows: int = 0
  rollout_memory_gb: float = 2.0

  def validate(self):
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator must be one of {ESTIMATORS}; got {self.estimator!r}.")


# ----------------------------------------------------------------------------- rollout plumbing


def _rows_per_block(backbone, capacity: int, batch: int, settings: BrierSettings, num_starts: int) -> int:
  """Start positions per rollout block, from the row budget or the memory budget."""
  if settings.rollout_rows:
    rows = settings.rollout_rows
  else:
    per_row = 2 * backbone.num_hidden_layers * capacity * backbone.num_key_value_heads * backbone.head_dim
    per_row *= jnp.dtype(dtype_of(backbone.dtype)).itemsize
    rows = int(settings.rollout_memory_gb * 2**30 // per_row)
  return int(min(max(rows // batch, 1), num_starts))


def _row_cache(cache, b_R, p_R, num_filled: int):
  """Copies batch rows b_R of a cache; slot c valid iff c <= p_R (teacher-forced part)."""
  def take(x):
    axis = x.ndim - 4  # [(layers,) B, C, G, Dh]
    return jnp.take(x, b_R, axis=axis)
  kv = jax.tree.map(take, {"k": cache["k"], "v": cache["v"]})
  slots = jnp.arange(cache["valid"].shape[1])
  valid = (slots[None, :] <= p_R[:, None]) & (slots[None, :] < num_filled)
  return dict(kv, valid=valid, index=cache["index"])


def _over_start_blocks(fn, num_starts: int, per_block: int, batch: int):
  """Runs fn(p_R, b_R, block_index) -> [R, ...] over all (start, row) pairs; returns [B, P, ...]."""
  num_blocks = -(-num_starts // per_block)
  starts = jnp.minimum(jnp.arange(num_blocks * per_block), num_starts - 1).reshape(num_blocks, per_block)

  def one(args):
    i, starts_Pc = args
    p_R = jnp.repeat(starts_Pc, batch)
    b_R = jnp.tile(jnp.arange(batch), per_block)
    return fn(p_R, b_R, i)

  out = jax.lax.map(one, (jnp.arange(num_blocks), starts))          # [nb, Pc*B, ...]
  out = out.reshape((num_blocks * per_block, batch) + out.shape[2:])[:num_starts]
  return jnp.swapaxes(out, 0, 1)


# ----------------------------------------------------------------------------- CALM


def calm_teacher_forced(cfg, ae_cfg, params, ae_params, tokens_BxT, key, capacity: int = 0):
  """Two decoded head samples per chunk position under teacher forcing.

  Returns (pred1_BxSxK, pred2_BxSxK, target_BxSxK, cache) with S = T/K - 1
  positions (chunk j's hidden state predicts chunk j+1); ``cache`` is the KV
  cache of the pass when ``capacity`` > 0, else None.
  """
  k = cfg.patch_size
  b, t = tokens_BxT.shape
  s = t // k - 1
  model = EnergyModel(cfg)
  cache = init_cache(cfg.backbone, b, capacity) if capacity else None
  h_BxSxD, cache = model.apply({"params": params}, tokens_BxT[:, :-k], None, cache, method="hidden")
  # Noise per row (row r from fold_in(key, r)), as the per-device path draws it: the same
  # numbers with or without a mesh.
  noise_2xBxSxE = sharded_losses.row_noise(cfg, key, jnp.arange(b), s, 2)
  z = heads.get(cfg).sample(params["generative_head"], h_BxSxD[None], noise_2xBxSxE)
  preds = Autoencoder(ae_cfg).apply({"params": ae_params}, z, method="decode_argmax")
  return preds[0], preds[1], tokens_BxT[:, k:].reshape(b, s, k), cache


def calm_rollout_collisions(cfg, ae_cfg, params, ae_params, cache, pred1_BxSxK, pred2_BxSxK, key,
                            per_block: int):
  """token_same [B, P, 4] for every start position p < P = S - ceil(4/K) (see module doc)."""
  b, s, k = pred1_BxSxK.shape
  num_starts = s - brier.num_chunks_to_cover(k)
  model, ae, head = EnergyModel(cfg), Autoencoder(ae_cfg), heads.get(cfg)

  def block(p_R, b_R, _):
    row_ids_R = p_R * b + b_R

    def step_fn(key_j, state, chunk_RxK):
      cache_R, position_R = state
      h, cache_R = model.apply({"params": params}, chunk_RxK, position_R[:, None], cache_R, method="hidden")
      noise_2xRxE = head_row_noise(cfg, key_j, row_ids_R, 2)
      z = head.sample(params["generative_head"], h[:, 0][None], noise_2xRxE)
      pair = ae.apply({"params": ae_params}, z, method="decode_argmax").astype(chunk_RxK.dtype)
      return pair, (cache_R, position_R + 1)

    state = (_row_cache(cache, b_R, p_R, s), p_R + 1)
    return brier.calm_rollout_token_same(step_fn, key, pred1_BxSxK[b_R, p_R], pred2_BxSxK[b_R, p_R], state)

  return _over_start_blocks(block, num_starts, per_block, b)


def calm_brier_block(cfg, ae_cfg, params, ae_params, tokens_BxT, key, settings: BrierSettings):
  """Per-position Brier-1..4 of CALM on one batch of blocks: [B, P, 4]."""
  k = cfg.patch_size
  key_tf, key_roll = jax.random.split(key)
  if k >= brier.MAX_N:
    pred1, pred2, target, _ = calm_teacher_forced(cfg, ae_cfg, params, ae_params, tokens_BxT, key_tf)
    return brier.calm_brier(pred1, pred2, target)
  steps = brier.num_chunks_to_cover(k)
  s = tokens_BxT.shape[1] // k - 1
  capacity = s + steps - 1
  pred1, pred2, target, cache = calm_teacher_forced(cfg, ae_cfg, params, ae_params, tokens_BxT, key_tf,
                                                    capacity)
  per_block = _rows_per_block(cfg.backbone, capacity, tokens_BxT.shape[0], settings, s - steps)
  same = calm_rollout_collisions(cfg, ae_cfg, params, ae_params, cache, pred1, pred2, key_roll, per_block)
  return brier.calm_brier(pred1, pred2, target, same)


# ----------------------------------------------------------------------------- baseline


def ar_teacher_forced(cfg, params, tokens_BxT, capacity: int):
  """Logits [B, T, V], log P(y_{t+1} | y_<=t) [B, T-1], and the KV cache of the pass."""
  cache = init_cache(cfg.backbone, tokens_BxT.shape[0], capacity)
  logits, cache = TransformerLM(cfg).apply({"params": params}, tokens_BxT, None, cache)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target_lp = jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
  return logits, target_lp, cache


def _ar_plain_rollout(step_fn, key, first_logits_RxV, state, target_Rx4):
  """Two independent 4-token samples per row, each along its own path; stops once
  every row's both samples left the target and each other.  Returns [2, R, 4]."""
  r = first_logits_RxV.shape[0]
  tok_2xR = jax.random.categorical(jax.random.fold_in(key, 0), first_logits_RxV, shape=(2, r))
  x_2xRx4 = jnp.zeros((2, r, brier.MAX_N), jnp.int32).at[:, :, 0].set(tok_2xR)

  def alive(tok_2xR, j):
    return (tok_2xR[0] == target_Rx4[:, j]) | (tok_2xR[1] == target_Rx4[:, j]) | (tok_2xR[0] == tok_2xR[1])

  def cond(c):
    return (c[0] < brier.MAX_N) & jnp.any(c[4])

  def body(c):
    j, state, tok_2xR, x_2xRx4, alive_R = c
    logits, state = step_fn(state, tok_2xR.reshape(2 * r))
    tok_2xR = jax.random.categorical(jax.random.fold_in(key, j), logits).reshape(2, r)
    x_2xRx4 = jax.lax.dynamic_update_slice(x_2xRx4, tok_2xR[:, :, None], (0, 0, j))
    return j + 1, state, tok_2xR, x_2xRx4, alive_R & alive(tok_2xR, j)

  init = (jnp.int32(1), state, tok_2xR, x_2xRx4, alive(tok_2xR, 0))
  return jax.lax.while_loop(cond, body, init)[3]


def ar_brier_block(cfg, params, tokens_BxT, key, settings: BrierSettings) -> dict[str, jax.Array]:
  """Per-position Brier-1..4 of the baseline: {'lowvar': [B, P, 4], 'plain': ...}, P = T - 4."""
  b, t = tokens_BxT.shape
  capacity = t + brier.MAX_N - 1
  logits, target_lp, cache = ar_teacher_forced(cfg, params, tokens_BxT, capacity)
  num_starts = t - brier.MAX_N
  model = TransformerLM(cfg)

  def step_fn(state, tokens_R):
    cache_R, position_R = state
    lg, cache_R = model.apply({"params": params}, tokens_R[:, None], position_R[:, None], cache_R)
    return lg[:, 0], (cache_R, position_R + 1)

  out = {}
  if settings.estimator in ("lowvar", "both"):
    per_block = _rows_per_block(cfg.backbone, capacity, b, settings, num_starts)

    def lowvar(p_R, b_R, i):
      state = (_row_cache(cache, b_R, p_R, t), p_R + 1)
      same, coll = brier.ar_rollout(step_fn, jax.random.fold_in(key, i), logits[b_R, p_R], state)
      return jnp.concatenate([same.astype(jnp.float32), coll], axis=-1)

    sc = _over_start_blocks(lowvar, num_starts, per_block, b)
    out["lowvar"] = brier.ar_brier_lowvar(target_lp, sc[..., :brier.MAX_N] > 0.5, sc[..., brier.MAX_N:])
  if settings.estimator in ("plain", "both"):
    per_block = max(_rows_per_block(cfg.backbone, capacity, b, settings, num_starts) // 2, 1)
    windows_BxPx4 = jnp.stack([tokens_BxT[:, 1 + j:1 + j + num_starts] for j in range(brier.MAX_N)], -1)
    key_plain = jax.random.fold_in(key, 1 << 30)

    def plain(p_R, b_R, i):
      rows2 = jnp.concatenate([b_R, b_R]), jnp.concatenate([p_R, p_R])
      state = (_row_cache(cache, rows2[0], rows2[1], t), rows2[1] + 1)
      x = _ar_plain_rollout(step_fn, jax.random.fold_in(key_plain, i), logits[b_R, p_R], state,
                            windows_BxPx4[b_R, p_R])
      return jnp.moveaxis(x, 0, 1)                                   # [R, 2, 4]

    x = _over_start_blocks(plain, num_starts, per_block, b)          # [B, P, 2, 4]
    out["plain"] = brier.two_sample_brier(x[:, :, 0], x[:, :, 1], windows_BxPx4)
  return out


# ----------------------------------------------------------------------------- drivers


def _block_fn(kind, cfg, ae_cfg, settings: BrierSettings):
  """``fn(params, ae_params, tokens_BxT, key) -> {estimator: [B, P, 4]}`` of one batch of blocks."""
  if kind == "energy":
    return lambda p, ap, tok, key: {"brier": calm_brier_block(cfg, ae_cfg, p, ap, tok, key, settings)}
  if kind == "transformer":
    return lambda p, ap, tok, key: ar_brier_block(cfg, p, tok, key, settings)
  raise ValueError(f"BrierLM needs an 'energy' or 'transformer' model; got kind={kind!r}.")


@functools.lru_cache(maxsize=8)
def _brier_fn(kind, cfg, ae_cfg, settings: BrierSettings):
  return jax.jit(_block_fn(kind, cfg, ae_cfg, settings))


@functools.lru_cache(maxsize=8)
def _per_device_brier_fn(kind, cfg, ae_cfg, settings: BrierSettings, mesh):
  """BrierLM sampling per device: ``fn(params, ae_params, tokens_BxT, row_mask_B, key)
  -> {estimator: (sums_Bx4, counts_B)}``, replicated (B x 4 numbers leave the devices).

  CALM with K >= 4: the backbone under the rules table's shardings, the two head
  samples, their decoding and comparison under ``jax.shard_map`` where each
  row's hidden states live, noise per global row (the result does not depend on
  the mesh, and equals the unsharded path's).  K < 4 and the baseline: the whole
  teacher-forced pass and the rollouts of a device's rows run on that device
  (parameters gathered over the batch axes, ``tensor`` left automatic), with the
  key folded with the device's batch-shard index, so draws differ between
  meshes but not in distribution.
  """
  if kind == "energy" and cfg.patch_size >= brier.MAX_N:
    rows_fn = sharded_losses.sharded_calm_brier_rows_fn(cfg, ae_cfg, mesh)
    per_row = lambda t: t // cfg.patch_size - 1

    def fn(params, ae_params, tokens_BxT, row_mask_B, key):
      counts = row_mask_B.astype(jnp.float32) * per_row(tokens_BxT.shape[1])
      key_tf = jax.random.split(key)[0]    # calm_brier_block's teacher-forcing key: same draws
      return {"brier": (rows_fn(params, ae_params, tokens_BxT, key_tf), counts)}
  else:
    block = _block_fn(kind, cfg, ae_cfg, settings)

    def per_device(params, ae_params, tokens_BxT, key):
      key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
      out = block(params, ae_params, tokens_BxT, key)                 # {name: [B_loc, P, 4]}
      return {name: (jnp.sum(v, axis=1), jnp.full(v.shape[:1], v.shape[1], jnp.float32))
              for name, v in out.items()}

    spec = jax.sharding.PartitionSpec(BATCH_AXES)
    rep_spec = jax.sharding.PartitionSpec()
    mapped = jax.shard_map(per_device, mesh=mesh, axis_names=frozenset(BATCH_AXES),
                           in_specs=(rep_spec, rep_spec, spec, rep_spec), out_specs=spec)

    def fn(params, ae_params, tokens_BxT, row_mask_B, key):
      out = mapped(params, ae_params, tokens_BxT, key)
      return {name: (sums, counts * row_mask_B.astype(jnp.float32)) for name, (sums, counts) in out.items()}

  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _pad_rows(tokens_BxT: np.ndarray, row_mask_B: np.ndarray, multiple: int):
  """Pads a batch with masked rows to a multiple of ``multiple`` rows."""
  pad = -tokens_BxT.shape[0] % multiple
  if not pad:
    return tokens_BxT, row_mask_B
  return (np.concatenate([tokens_BxT, np.repeat(tokens_BxT[-1:], pad, axis=0)]),
          np.concatenate([row_mask_B, np.zeros(pad, bool)]))


def check_block_length(kind: str, cfg, block_length: int) -> None:
  """A block must hold more chunks than one 4-token n-gram spans (and whole chunks for CALM)."""
  k = cfg.patch_size if kind == "energy" else 1
  need = k * (brier.num_chunks_to_cover(k) + 2) if kind == "energy" else brier.MAX_N + 1
  if block_length % k or block_length < need:
    raise ValueError(f"eval block_length={block_length} must be a multiple of K={k} and >= {need}.")


def evaluate_brier(kind: str, cfg, params, batches: Iterable[dict], key: jax.Array, *, ae_cfg=None,
                   ae_params=None, settings: BrierSettings = BrierSettings(), num_batches: int | None = None,
                   progress: bool = True, mesh=None) -> dict[str, Any]:
  """BrierLM over eval batches ``{'tokens': [B, T], 'row_mask': [B] (optional)}``.

  With ``mesh``, each batch is split over the mesh's batch axes and sampled per
  device (:func:`_per_device_brier_fn`); a multi-process run passes each
  process's own rows, and every process gets the same result.  Parameters may be
  sharded by the rules table.  Single-process batches are padded with masked
  rows to a multiple of data x fsdp.

  Returns ``brier1..4``, ``brierlm`` (0 when ``at_chance``, i.e. some Brier-n <= 0),
  ``brierlm_reference`` (the reference's formula), their ``_se`` (jackknife over blocks;
  see ``brier.BrierAccumulator``), ``at_chance``, ``num_rows``, ``num_positions``, ``block_length``;
  for the baseline with estimator 'both' the 'lowvar' numbers at the top level
  and the 'plain' ones under ``"plain"``.
  """
  settings.validate()
  fn = _brier_fn(kind, cfg, ae_cfg, settings) if mesh is None else \
      _per_device_brier_fn(kind, cfg, ae_cfg, settings, mesh)
  accs: dict[str, brier.BrierAccumulator] = {}
  block_length = None
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=num_batches, desc="brier", dynamic_ncols=True)
  for i, batch in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    tokens = np.asarray(batch["tokens"], np.int32)
    if block_length is None:
      block_length = tokens.shape[1]
      check_block_length(kind, cfg, block_length)
    row_mask = np.asarray(batch.get("row_mask", np.ones(tokens.shape[0], bool)), bool)
    key_i = jax.random.fold_in(key, i)
    if mesh is None:
      out = jax.device_get(fn(params, ae_params, jnp.asarray(tokens), key_i))
      for name, values in out.items():
        accs.setdefault(name, brier.BrierAccumulator()).update(
            values, np.broadcast_to(row_mask[:, None], values.shape[:2]))
    else:
      if jax.process_count() == 1:
        tokens, row_mask = _pad_rows(tokens, row_mask, batch_divisor(mesh))
      placed = put_batch(mesh, {"tokens": tokens, "row_mask": row_mask})
      with jax.set_mesh(mesh):
        out = jax.device_get(fn(params, ae_params, placed["tokens"], placed["row_mask"], key_i))
      for name, (sums, counts) in out.items():
        accs.setdefault(name, brier.BrierAccumulator()).update_rows(sums, counts)
    if bar is not None:
      bar.update(1)
      first = accs[next(iter(accs))]
      if first._sums:  # pylint: disable=protected-access
        bar.set_postfix(brierlm=f"{first.result()['brierlm']:.3f}", refresh=False)
  if bar is not None:
    bar.close()
  if not accs:
    raise ValueError("evaluate_brier: the eval iterator yielded no batches")
  names = list(accs)
  result = dict(accs[names[0]].result(), estimator=names[0] if kind == "transformer" else "calm",
                block_length=block_length)
  for name in names[1:]:
    result[name] = dict(accs[name].result(), block_length=block_length)
  return result


def format_brier(result: dict[str, Any]) -> str:
  """A small table: Brier-1..4 (x100) and BrierLM with standard errors, one line per estimator.

  Each line ends with the block length (BrierLM moves with it) and, when some
  Brier-n <= 0, "at chance" (BrierLM is then 0; the reference's formula, which
  clips only the product, is shown beside it as ``ref``).
  """
  block = result.get("block_length")

  def rows(r, label):
    cells = [f"{100 * r[f'brier{n}']:7.3f} ± {100 * r[f'brier{n}_se']:.3f}" for n in range(1, 5)]
    lm = f"{r['brierlm']:7.3f} ± {r['brierlm_se']:.3f}"
    ref = r.get("brierlm_reference")
    tail = f"  ref {ref:7.3f}" if ref is not None else ""
    chance = r.get("at_chance", any(r[f"brier{n}"] <= 0 for n in range(1, 5)))
    return (f"{label:8s} " + "  ".join(cells) + f"  | {lm}{tail}  | T={r.get('block_length', block)}"
            + ("  at chance (a Brier-n <= 0)" if chance else ""))
  head = (f"{'':8s} " + "  ".join(f"{'Brier-' + str(n) + ' (x100)':>17s}" for n in range(1, 5))
          + "  | BrierLM          ref (reference formula)")
  lines = [head, rows(result, result.get("estimator", ""))]
  lines += [rows(v, k) for k, v in result.items() if isinstance(v, dict) and "brier1" in v]
  lines.append(f"({result['num_rows']} blocks of {block} tokens, "
               f"{result['num_positions']} positions)")
  return "\n".join(lines)


def write_json(path: str, result: dict[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
    f.write("\n")
  return path


# ----------------------------------------------------------------------------- autoencoder


@functools.lru_cache(maxsize=4)
def _ae_fn(ae_cfg, sigmas: tuple[float, ...], pad_id: int):
  ae = Autoencoder(ae_cfg)

  def run(ae_params, tokens_BxT, key):
    b, t = tokens_BxT.shape
    k = ae_cfg.patch_size
    mean, log_std = ae.apply({"params": ae_params}, tokens_BxT, method="encode")
    eps = jax.random.normal(key, (len(sigmas) + 1,) + mean.shape, mean.dtype)
    sig = jnp.asarray(sigmas, mean.dtype)[:, None, None, None]
    z_MxBxSxL = jnp.concatenate([mean[None] + sig * eps[:-1], (mean + jnp.exp(log_std) * eps[-1])[None]])
    pred = ae.apply({"params": ae_params}, z_MxBxSxL, method="decode_argmax")
    target_BxSxK = tokens_BxT.reshape(b, t // k, k)
    real = target_BxSxK != pad_id
    right = (pred == target_BxSxK[None]) | ~real[None]   # PAD fill is not scored
    chunk_real = jnp.any(real, axis=-1)
    return {"tokens": jnp.sum(right & real[None], axis=(1, 2, 3)), "num_tokens": jnp.sum(real),
            "chunks": jnp.sum(jnp.all(right, -1) & chunk_real[None], axis=(1, 2)),
            "num_chunks": jnp.sum(chunk_real)}

  return jax.jit(run)


def evaluate_autoencoder(ae_cfg, ae_params, batches: Iterable[dict], key: jax.Array, *,
                         sigmas=AE_SIGMAS, pad_id: int = -1, num_batches: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
  """Token and whole-chunk reconstruction accuracy with z = mean + sigma * eps.

  PAD tokens (``pad_id``) are not scored.  Besides the fixed sigmas, the row
  'posterior' decodes z = mean + exp(log_std) * eps (the VAE's own sample).
  Returns {'sigmas': [...], 'token_accuracy': [...], 'chunk_accuracy': [...]}
  (the last entry of each list is the posterior row) and the counts.
  """
  fn = _ae_fn(ae_cfg, tuple(float(s) for s in sigmas), int(pad_id))
  sums = None
  it = enumerate(batches)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    it = tqdm(it, total=num_batches, desc="autoencoder", dynamic_ncols=True)
  for i, batch in it:
    if num_batches is not None and i >= num_batches:
      break
    out = jax.device_get(fn(ae_params, jnp.asarray(batch["tokens"], jnp.int32), jax.random.fold_in(key, i)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  if sums is None:
    raise ValueError("evaluate_autoencoder: the eval iterator yielded no batches")
  return {"sigmas": [float(s) for s in sigmas] + ["posterior"],
          "token_accuracy": (np.asarray(sums["tokens"]) / max(int(sums["num_tokens"]), 1)).tolist(),
          "chunk_accuracy": (np.asarray(sums["chunks"]) / max(int(sums["num_chunks"]), 1)).tolist(),
          "num_tokens": int(sums["num_tokens"]), "num_chunks": int(sums["num_chunks"])}


def format_autoencoder(result: dict[str, Any]) -> str:
  lines = [f"{'sigma':>10s}  {'token acc (%)':>14s}  {'chunk acc (%)':>14s}"]
  for s, ta, ca in zip(result["sigmas"], result["token_accuracy"], result["chunk_accuracy"]):
    label = f"{s:.2f}" if isinstance(s, float) else s
    lines.append(f"{label:>10s}  {100 * ta:14.4f}  {100 * ca:14.4f}")
  lines.append(f"({result['num_tokens']} tokens, {result['num_chunks']} chunks)")
  return "\n".join(lines)
