"""Training dynamics of calm_jax against the authors' PyTorch code, step by step.

  PYTHONPATH=. python benchmarks/train_dynamics.py                       # every case, ~10 min on 2 cores
  PYTHONPATH=. python benchmarks/train_dynamics.py --cases=ae_fp32_shared,calm_fp32_shared
  PYTHONPATH=. python benchmarks/train_dynamics.py --quick               # 40 steps a case (a smoke run)

Needs the reference checkout (``CALM_REFERENCE_DIR``, default /work/ref) and a
Python with torch + transformers (``CALM_REFERENCE_PYTHON``, default
/work/refvenv/bin/python); the reference side is
``benchmarks/train_dynamics_reference.py``, run in a subprocess.

What one case does:

1. calm_jax initialises a tiny model (autoencoder, CALM on a frozen autoencoder,
   or the Transformer baseline; byte-level vocabulary V = 256) and exports it with
   ``calm_jax.interop``; the reference loads that folder with ``from_pretrained``.
   Both start from the same weights.
2. Batches: fixed windows of the embedded corpus's training text, as bytes, the
   same on both sides (``[steps, B, T]``; with accumulation each step's batch is
   split into micro-batches the way calm_jax splits it, rows i, i+m, ...).
3. calm_jax trains with its own jitted ``trainers.make_train_step`` (AdamW,
   clipping, linear warm-up to a constant learning rate, the decay mask of
   ``optim.decay_mask``).  The reference trains as the HF Trainer does: AdamW
   (torch) over the parameter groups of ``Trainer.get_decay_parameter_names``,
   ``get_scheduler('constant_with_warmup')``, loss / accumulation steps summed over
   micro-batches, ``clip_grad_norm_(1.0)``; under ``torch.autocast('cpu', bf16)``
   for the bf16 cases (the HF ``--bf16`` flag), with the models in training mode.
4. Noise: ``shared`` records every random draw calm_jax makes inside its train
   step (``jax.random.uniform/normal/bernoulli``, in order, through an ordered
   ``jax.debug.callback``) and the reference consumes them in place of its own
   ``torch.rand_like`` / ``randn_like`` / ``rand`` / ``randn`` / ``dropout`` masks, so
   in fp32 the two runs must follow each other to float rounding.
   ``independent``: each side draws its own noise; then the curves can only agree
   statistically: per 50-step window, the mean of the paired differences (same
   batches) is compared with its standard error.
5. Precision: fp32 on both sides, except that the reference's autoencoder *encoder*
   casts its token embeddings to bf16 whenever it is in training mode
   (``modeling_autoencoder.py``); for fp32 cases the encoder module (no dropout
   inside) is put in eval mode, for CALM the frozen autoencoder too.  ``bf16``:
   calm_jax with ``dtype='bfloat16'`` (fp32 parameters, bf16 compute) against the
   reference under autocast in training mode, including that cast.

Writes ``benchmarks/RESULTS_dynamics.json`` (per case: both loss curves, the
learning rates, step-by-step differences, window statistics) and
``benchmarks/dynamics.png``; the discussion is in benchmarks/RESULTS_dynamics.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calm_jax import interop, models
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.training import optim, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
REF_DIR = os.environ.get("CALM_REFERENCE_DIR", "/work/ref")
REF_PY = os.environ.get("CALM_REFERENCE_PYTHON", "/work/refvenv/bin/python")
V = 256          # bytes
WINDOW = 50      # steps per window of the independent-noise comparison


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str              # autoencoder | energy | transformer
  dtype: str             # float32 | bfloat16
  noise: str             # shared | independent
  steps: int
  batch: int             # rows per optimizer step (all micro-batches together)
  block: int             # tokens per row
  accum: int = 1
  lr: float = 1e-3
  warmup: int = 10


# Step counts are what a 2-core machine shared with others ran in minutes (the reference's
# eager CPU steps are the slow side); the accumulation cases only need to show the split.
CASES = {
    "ae_fp32_shared": Case("autoencoder", "float32", "shared", 300, 16, 32),
    "ae_fp32_independent": Case("autoencoder", "float32", "independent", 300, 16, 32),
    "ae_fp32_accum4_shared": Case("autoencoder", "float32", "shared", 30, 16, 32, accum=4),
    "ae_bf16_shared": Case("autoencoder", "bfloat16", "shared", 150, 16, 32),
    "ae_bf16_independent": Case("autoencoder", "bfloat16", "independent", 300, 16, 32),
    "calm_fp32_shared": Case("energy", "float32", "shared", 200, 4, 32),
    "calm_fp32_independent": Case("energy", "float32", "independent", 200, 4, 32),
    "calm_fp32_accum2_shared": Case("energy", "float32", "shared", 30, 4, 32, accum=2),
    "calm_bf16_shared": Case("energy", "bfloat16", "shared", 100, 4, 32),
    "calm_bf16_independent": Case("energy", "bfloat16", "independent", 200, 4, 32),
    "tf_fp32": Case("transformer", "float32", "shared", 100, 8, 64),
    "tf_fp32_accum4": Case("transformer", "float32", "shared", 30, 8, 64, accum=4),
    "tf_bf16": Case("transformer", "bfloat16", "shared", 100, 8, 64),
}


# ----------------------------------------------------------------------------- configs and data


def ae_config(dtype: str) -> AutoencoderConfig:
  return AutoencoderConfig(vocab_size=V, hidden_size=64, intermediate_size=128, latent_size=16, patch_size=4,
                           num_encoder_layers=2, num_decoder_layers=2, dtype=dtype)


def backbone(dtype: str, max_pos: int) -> LlamaConfig:
  return LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, dtype=dtype)


def energy_config(dtype: str, block: int) -> EnergyConfig:
  # 100 posterior samples: the reference's energy_score hard-codes n_y = 100.
  return EnergyConfig(backbone=backbone(dtype, block // 4), patch_size=4, latent_size=16, noise_size=16,
                      num_mlp_layers=1, num_samples=8, num_target_samples=100, beta=1.0)


def corpus_bytes() -> np.ndarray:
  from calm_jax.data import corpus  # pylint: disable=import-outside-toplevel
  train, _ = corpus.default_corpus()
  return np.frombuffer("\n\n".join(train[:400]).encode("utf-8"), np.uint8)


def make_batches(case: Case, seed: int = 1) -> np.ndarray:
  """[steps, batch, block] int32 windows of the corpus bytes."""
  data = corpus_bytes()
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - case.block, (case.steps, case.batch))
  return data[starts[..., None] + np.arange(case.block)].astype(np.int32)


# ----------------------------------------------------------------------------- draw recording

_DRAWS: list[np.ndarray] = []


def _record(x):
  _DRAWS.append(np.asarray(x, np.float32))


def _recording(fn):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    out = fn(*args, **kwargs)
    jax.debug.callback(_record, out, ordered=True)
    return out
  return wrapped


def install_recorders() -> None:
  """Every public jax.random.uniform/normal/bernoulli call, and calm_jax.models.rng.normal (the
  posterior draws), records its output (in call order)."""
  from calm_jax.models import rng  # pylint: disable=import-outside-toplevel
  for name in ("uniform", "normal", "bernoulli"):
    setattr(jax.random, name, _recording(getattr(jax.random, name)))
  rng.normal = _recording(rng.normal)


# ----------------------------------------------------------------------------- calm_jax side


def run_calm_jax(case: Case, folder: str, batches: np.ndarray, draws_path: str | None, noise_seed: int = 0):
  """Initialises (always from seed 0), exports to ``folder``, trains with the noise of ``noise_seed``;
  returns (losses, learning rates, grad norms, decay-group sizes)."""
  key = jax.random.key(0)
  k_ae, k_model, k_train = jax.random.split(key, 3)
  if noise_seed:
    k_train = jax.random.fold_in(k_train, noise_seed)
  ae_cfg, ae_params = None, None
  if case.kind == "autoencoder":
    cfg = ae_config(case.dtype)
    params = models.init_params(cfg, k_model)
    interop.export_autoencoder(folder, cfg, params)
  elif case.kind == "energy":
    ae_cfg = ae_config(case.dtype)
    ae_params = models.init_params(ae_cfg, k_ae)
    cfg = energy_config(case.dtype, case.block)
    params = models.init_params(cfg, k_model)
    # A randomly initialised head ends in a zero layer (as the reference's): perturb nothing,
    # the first updates move it.
    interop.export_energy(folder, cfg, params, ae_cfg, ae_params)
  else:
    cfg = TransformerConfig(backbone=backbone(case.dtype, case.block))
    params = models.init_params(cfg, k_model)
    interop.export_transformer(folder, cfg, params)
  mask = optim.decay_mask(params)
  sizes = [sum(int(np.size(x)) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m == want)
           for want in (True, False)]
  ocfg = optim.OptimConfig(learning_rate=case.lr, schedule="warmup_constant", warmup_steps=case.warmup,
                           grad_accum_steps=case.accum)
  tx = trainers.make_optimizer(ocfg)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  step_fn = jax.jit(trainers.make_train_step(case.kind, cfg, ocfg, tx, ae_cfg=ae_cfg), donate_argnums=(0,))
  losses, lrs, gnorms, per_step = [], [], [], []
  jax.effects_barrier()
  _DRAWS.clear()      # initialisation's draws are not the train step's
  for i in range(case.steps):
    n0 = len(_DRAWS)
    state, m = step_fn(state, {"tokens": jnp.asarray(batches[i])}, k_train, ae_params)
    m = jax.device_get(m)
    jax.effects_barrier()
    losses.append(float(m["train/loss"]))
    lrs.append(float(m["train/learning_rate"]))
    gnorms.append(float(m["train/grad_norm"]))
    per_step.append(len(_DRAWS) - n0)
  if draws_path is not None:
    np.savez(draws_path, counts=np.array(per_step), **{f"d{j}": d for j, d in enumerate(_DRAWS)})
  _DRAWS.clear()
  return np.array(losses), np.array(lrs), np.array(gnorms), sizes


# ----------------------------------------------------------------------------- comparison


def window_stats(a: np.ndarray, b: np.ndarray, window: int = WINDOW) -> list[dict]:
  """Per window: means of both curves, the mean paired difference and its standard error."""
  out = []
  for s in range(0, len(a) - window + 1, window):
    d = a[s:s + window] - b[s:s + window]
    se = float(d.std(ddof=1) / np.sqrt(window))
    out.append({"steps": [s, s + window], "calm_jax": float(a[s:s + window].mean()),
                "reference": float(b[s:s + window].mean()), "diff": float(d.mean()), "se": se,
                "z": float(d.mean() / se) if se > 0 else 0.0})
  return out


def seed_window_stats(a_RxT: np.ndarray, b_RxT: np.ndarray, window: int = WINDOW) -> list[dict]:
  """Independent noise, several noise seeds per side: per window, the difference of the seed-mean
  window means and its standard error from the pooled between-seed spread (a two-sample t statistic).

  Unlike the paired per-step differences of one pair of runs, this counts the trajectory-level
  noise: two runs with different draws drift apart and stay apart for many steps, so their
  per-step differences are not independent.
  """
  out = []
  for s in range(0, a_RxT.shape[1] - window + 1, window):
    a, b = a_RxT[:, s:s + window].mean(1), b_RxT[:, s:s + window].mean(1)
    pooled = (np.sum((a - a.mean()) ** 2) + np.sum((b - b.mean()) ** 2)) / max(len(a) + len(b) - 2, 1)
    se = float(np.sqrt(pooled * (1 / len(a) + 1 / len(b))))
    diff = float(a.mean() - b.mean())
    out.append({"steps": [s, s + window], "calm_jax": float(a.mean()), "reference": float(b.mean()),
                "calm_jax_seed_sd": float(a.std(ddof=1)) if len(a) > 1 else None,
                "reference_seed_sd": float(b.std(ddof=1)) if len(b) > 1 else None,
                "diff": diff, "se": se, "z": diff / se if se > 0 else 0.0})
  return out


def run_seeds(name: str, case: Case, tmp: str, ours_seeds: int, ref_seeds: int) -> dict:
  """Independent noise: calm_jax with noise seeds 0..ours_seeds-1, the reference with torch seeds
  0..ref_seeds-1, all from the same weights on the same batches."""
  d = os.path.join(tmp, name)
  os.makedirs(d, exist_ok=True)
  folder = os.path.join(d, "weights")
  batches = make_batches(case)
  np.save(os.path.join(d, "batches.npy"), batches)
  ours = [run_calm_jax(case, folder, batches, None, seed)[0] for seed in range(ours_seeds)]
  theirs = []
  for seed in range(ref_seeds):
    cmd = [REF_PY, os.path.join(HERE, "train_dynamics_reference.py"), "--kind", case.kind, "--folder", folder,
           "--batches", os.path.join(d, "batches.npy"), "--dtype", case.dtype, "--accum", str(case.accum),
           "--lr", str(case.lr), "--warmup", str(case.warmup), "--seed", str(seed),
           "--out", os.path.join(d, f"ref{seed}.npz")]
    env = dict(os.environ, CALM_REFERENCE_DIR=REF_DIR, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
      raise RuntimeError(f"{name}: reference driver failed:\n{r.stderr[-4000:]}")
    theirs.append(np.load(os.path.join(d, f"ref{seed}.npz"))["losses"])
  a, b = np.array(ours), np.array(theirs)
  return {"case": dataclasses.asdict(case), "calm_jax_seeds": a.tolist(), "reference_seeds": b.tolist(),
          "calm_jax": a.mean(0).tolist(), "reference": b.mean(0).tolist(),
          "seed_windows": seed_window_stats(a, b), "paired_windows_seed0": window_stats(a[0], b[0])}


def run_case(name: str, case: Case, tmp: str) -> dict:
  d = os.path.join(tmp, name)
  os.makedirs(d, exist_ok=True)
  folder = os.path.join(d, "weights")
  batches = make_batches(case)
  np.save(os.path.join(d, "batches.npy"), batches)
  draws = os.path.join(d, "draws.npz") if case.noise == "shared" and case.kind != "transformer" else None
  t0 = time.perf_counter()
  ours, lr_ours, gn_ours, groups = run_calm_jax(case, folder, batches, draws)
  t_ours = time.perf_counter() - t0
  cmd = [REF_PY, os.path.join(HERE, "train_dynamics_reference.py"), "--kind", case.kind, "--folder", folder,
         "--batches", os.path.join(d, "batches.npy"), "--dtype", case.dtype, "--accum", str(case.accum),
         "--lr", str(case.lr), "--warmup", str(case.warmup), "--out", os.path.join(d, "ref.npz")]
  if draws:
    cmd += ["--draws", draws]
  env = dict(os.environ, CALM_REFERENCE_DIR=REF_DIR, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  t_ref = time.perf_counter() - t0
  if r.returncode != 0:
    raise RuntimeError(f"{name}: reference driver failed:\n{r.stderr[-4000:]}")
  ref = np.load(os.path.join(d, "ref.npz"))
  theirs, lr_ref, gn_ref = ref["losses"], ref["lrs"], ref["grad_norms"]
  diff = np.abs(ours - theirs)
  rel = diff / np.maximum(np.abs(theirs), 1e-12)
  res = {"case": dataclasses.asdict(case), "calm_jax": ours.tolist(), "reference": theirs.tolist(),
         "lr_calm_jax": lr_ours.tolist(), "lr_reference": lr_ref.tolist(),
         "grad_norm_calm_jax": gn_ours.tolist(), "grad_norm_reference": gn_ref.tolist(),
         "decay_groups_calm_jax": groups, "decay_groups_reference": [int(x) for x in ref["group_sizes"]],
         "max_abs_diff": float(diff.max()), "max_rel_diff": float(rel.max()),
         "max_rel_diff_first10": float(rel[:10].max()),
         "max_lr_rel_diff": float(np.max(np.abs(lr_ours - lr_ref) / np.maximum(lr_ref, 1e-30))),
         "windows": window_stats(ours, theirs), "seconds_calm_jax": t_ours, "seconds_reference": t_ref,
         "reference_log": r.stdout.strip().splitlines()[-3:]}
  return res


def plot(results: dict, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(results)
  cols = 3
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    r = results[name]
    ax.plot(r["reference"], color="tab:orange", lw=1.6, label="reference (PyTorch)")
    ax.plot(r["calm_jax"], color="tab:blue", lw=0.8, ls="--", label="calm_jax")
    if "seed_windows" in r:
      for curve in r["calm_jax_seeds"][1:]:
        ax.plot(curve, color="tab:blue", lw=0.4, alpha=0.5)
      for curve in r["reference_seeds"][1:]:
        ax.plot(curve, color="tab:orange", lw=0.4, alpha=0.5)
      zs = ", ".join(f"{w['z']:+.1f}" for w in r["seed_windows"])
      ax.set_title(f"{name}: seed means\n{len(r['calm_jax_seeds'])} vs {len(r['reference_seeds'])} seeds; "
                   f"window z {zs}", fontsize=7)
    else:
      ax.set_title(f"{name}\nmax |rel diff| {r['max_rel_diff']:.1e}", fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.set_ylabel("train loss", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def report(results: dict) -> str:
  """Markdown tables of a results JSON (for RESULTS_dynamics.md)."""
  lines = [("| case | steps | B x T (accum) | max abs diff | max rel diff | median rel diff | steps with rel diff "
            "<= 1e-6 | lr max rel diff | decay groups (ours = ref) |"), "|---|---:|---|---:|---:|---:|---:|---:|---|"]
  for name, r in results.items():
    if "max_rel_diff" not in r:
      continue
    c = r["case"]
    a, b = np.array(r["calm_jax"]), np.array(r["reference"])
    rel = np.abs(a - b) / np.abs(b)
    lines.append(f"| {name} | {c['steps']} | {c['batch']} x {c['block']} ({c['accum']}) | {r['max_abs_diff']:.2e} | "
                 f"{r['max_rel_diff']:.2e} | {np.median(rel):.1e} | {np.mean(rel <= 1e-6):.0%} | "
                 f"{r['max_lr_rel_diff']:.1e} | {r['decay_groups_calm_jax']} "
                 f"{'=' if r['decay_groups_calm_jax'] == r['decay_groups_reference'] else '!='} "
                 f"{r['decay_groups_reference']} |")
  lines += ["", "| case | seeds (ours, ref) | window | calm_jax | reference | diff | se | z | seed sd (ours, ref) |",
            "|---|---|---|---:|---:|---:|---:|---:|---|"]
  for name, r in results.items():
    for w in r.get("seed_windows", []):
      sd = f"{w['calm_jax_seed_sd']:.3f}, " + (f"{w['reference_seed_sd']:.3f}" if w["reference_seed_sd"] else "-")
      lines.append(f"| {name} | {len(r['calm_jax_seeds'])}, {len(r['reference_seeds'])} | {w['steps'][0]}-"
                   f"{w['steps'][1]} | {w['calm_jax']:.4f} | {w['reference']:.4f} | {w['diff']:+.4f} | "
                   f"{w['se']:.4f} | {w['z']:+.1f} | {sd} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--quick", action="store_true", help="40 steps a case")
  ap.add_argument("--max_steps", type=int, default=0, help="cap every case at this many steps")
  ap.add_argument("--out", default=os.path.join(HERE, "RESULTS_dynamics.json"))
  ap.add_argument("--plot", default=os.path.join(HERE, "dynamics.png"))
  ap.add_argument("--seeds", default="", help="OURS,REF: independent cases run this many noise seeds per side")
  ap.add_argument("--merge", action="store_true", help="update the cases in an existing --out JSON")
  ap.add_argument("--report", action="store_true", help="print markdown tables of --out, redraw --plot, exit")
  args = ap.parse_args()
  if args.report:
    with open(args.out) as f:
      results = json.load(f)["results"]
    print(report(results))
    print("wrote", plot(results, args.plot))
    return
  names = args.cases.split(",")
  unknown = [n for n in names if n not in CASES]
  if unknown:
    sys.exit(f"error: --cases: unknown {unknown}; known: {list(CASES)}")
  install_recorders()
  results = {}
  if args.merge and os.path.isfile(args.out):
    with open(args.out) as f:
      results = json.load(f)["results"]
  seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
  with tempfile.TemporaryDirectory(prefix="calm_dyn_") as tmp:
    for name in names:
      case = CASES[name]
      cap = 40 if args.quick else args.max_steps
      if cap:
        case = dataclasses.replace(case, steps=min(case.steps, cap))
      if seeds and case.noise == "independent":
        r = results[name] = run_seeds(name, case, tmp, *seeds)
        zs = [round(w["z"], 1) for w in r["seed_windows"]]
        print(f"{name:26s} seeds {seeds}: window z {zs}", flush=True)
        _write(args.out, results)
        continue
      r = run_case(name, case, tmp)
      results[name] = r
      zs = [w["z"] for w in r["windows"]]
      print(f"{name:26s} max|diff| {r['max_abs_diff']:.2e}  max rel {r['max_rel_diff']:.2e}  "
            f"lr rel {r['max_lr_rel_diff']:.1e}  window z {[f'{z:+.1f}' for z in zs]}  "
            f"({r['seconds_calm_jax']:.0f} s + {r['seconds_reference']:.0f} s)", flush=True)
      _write(args.out, results)
  print("wrote", _write(args.out, results, machine=True), plot(results, args.plot))


def _write(path: str, results: dict, machine: bool = False) -> str:
  """Writes after every case, so a long run that is stopped keeps what it measured."""
  meta = {"jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  if machine:
    meta["machine"] = _machine()
  with open(path, "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1)
    f.write("\n")
  return path


def _machine() -> str:
  sys.path.insert(0, HERE)
  import machine  # pylint: disable=import-outside-toplevel
  return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; {machine.describe()}"


if __name__ == "__main__":
  main()
