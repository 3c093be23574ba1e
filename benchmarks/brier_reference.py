"""BrierLM of calm_jax on converted reference checkpoints against the reference's own evaluation.

  CALM_REFERENCE_DIR=/work/ref CALM_REFERENCE_PYTHON=/work/refvenv/bin/python \\
      python benchmarks/brier_reference.py [--blocks 256] [--block_length 64] [--models energy,llama]

A script, not a test.  Steps:

1. ``benchmarks/reference_brier_driver.py create`` (under the reference's
   Python) builds random reference models, a CALM (``EnergyTransformer``, K = 4)
   with its autoencoder and a ``LlamaForCausalLM`` baseline, and saves them with
   ``save_pretrained``.  The baseline's ``lm_head`` is scaled (``--lm_scale``) so
   that its next-token distributions are peaked; CALM's head is left as built
   (the perturbed, zero-initialised output layer gives latents whose decoded
   chunks already collide often).
2. calm_jax imports the folders (``interop.import_energy`` / ``import_transformer``).
3. Eval data are *the models' own samples* (calm_jax ``generate`` at T = 1 after a
   random one-chunk / one-token prompt), so that Brier-1..4 are far from 0; on
   random text a random model scores ~0 and a comparison says nothing.
4. calm_jax scores the blocks with ``evaluate.evaluate_brier`` (CALM: the
   two-sample estimator at every chunk position; baseline: the 'lowvar'
   estimator of the reference's train_ar.py).  Per-block values for the paired
   comparison come from the same jitted block functions with the same keys; the
   script checks that their means equal evaluate_brier's.
5. ``reference_brier_driver.py eval`` runs the reference's evaluation code on the
   same blocks, one block per forward pass (``EnergyTransformer.forward`` in eval
   mode -> ``CALM.eval_brier``; ``train_ar.CustomTrainer.compute_loss``), and the
   reference's aggregate is the mean of those per-block values (its
   ``compute_metrics``).  Standard errors on both sides: jackknife over blocks
   (``brier.BrierAccumulator``).
6. For each Brier-n and BrierLM: z = |ours - ref| / sqrt(se_ours^2 + se_ref^2)
   (two independent estimates), and a paired z from the per-block differences
   (the two share the blocks, so this is the sharper test of the estimators).

Output: a Markdown table on stdout (and ``--json`` if given).  Precision fp32 on
both sides; everything on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from calm_jax import interop  # noqa: E402
from calm_jax.evaluation import brier, evaluate  # noqa: E402
from calm_jax.generation.generate import GenerationSettings, generate  # noqa: E402

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_brier_driver.py")
NO_TOKEN = -1     # PAD / EOS ids outside the vocabulary: generation never stops or drops a token
NAMES = ("brier1", "brier2", "brier3", "brier4", "brierlm")


def _reference_env():
  ref_dir, ref_py = os.environ.get("CALM_REFERENCE_DIR"), os.environ.get("CALM_REFERENCE_PYTHON")
  if not ref_dir or not os.path.isdir(os.path.join(ref_dir, "models")):
    sys.exit("brier_reference.py: set CALM_REFERENCE_DIR to a checkout of github shaochenze/calm "
             f"(got {ref_dir!r})")
  if not ref_py or not os.path.exists(ref_py):
    sys.exit("brier_reference.py: set CALM_REFERENCE_PYTHON to a Python with torch and transformers "
             f"(got {ref_py!r})")
  return ref_dir, ref_py


def _run_driver(ref_py, env, *args):
  t0 = time.perf_counter()
  r = subprocess.run([ref_py, DRIVER, *args], capture_output=True, text=True, env=env)
  if r.returncode != 0:
    sys.exit(f"brier_reference.py: the reference driver failed ({' '.join(args[:1])}):\n{r.stderr[-3000:]}")
  print(f"# reference {args[0]}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  return r.stdout


def _own_samples(kind, cfg, params, ae_cfg, ae_params, num_blocks, block_length, seed):
  """num_blocks x block_length tokens: a random prompt (one chunk / one token), then T = 1 samples."""
  k = cfg.patch_size if kind == "energy" else 1
  vocab = ae_cfg.vocab_size if kind == "energy" else cfg.backbone.vocab_size
  prompts = np.random.default_rng(seed).integers(0, vocab, (num_blocks, k)).astype(np.int32)
  g = generate(kind, cfg, params, list(prompts), jax.random.PRNGKey(seed),
               GenerationSettings(max_new_tokens=block_length - k, temperature=1.0),
               eos_id=NO_TOKEN - 1, pad_id=NO_TOKEN, ae_cfg=ae_cfg, ae_params=ae_params)
  return np.concatenate([prompts, np.stack(g.tokens).astype(np.int32)], axis=1)


def _ours(kind, cfg, params, ae_cfg, ae_params, tokens, batch_size, seed):
  """evaluate_brier's result, and the per-block means [R, 4] from the same block function and keys."""
  batches = [{"tokens": tokens[i:i + batch_size]} for i in range(0, len(tokens), batch_size)]
  key = jax.random.PRNGKey(seed)
  settings = evaluate.BrierSettings(estimator="lowvar")
  t0 = time.perf_counter()
  result = evaluate.evaluate_brier(kind, cfg, params, batches, key, ae_cfg=ae_cfg, ae_params=ae_params,
                                   settings=settings, progress=False)
  seconds = time.perf_counter() - t0
  if kind == "energy":
    fn = jax.jit(lambda p, ap, tok, k: evaluate.calm_brier_block(cfg, ae_cfg, p, ap, tok, k, settings))
  else:
    fn = jax.jit(lambda p, ap, tok, k: evaluate.ar_brier_block(cfg, p, tok, k, settings)["lowvar"])
  per_block = [np.asarray(fn(params, ae_params, jnp.asarray(b["tokens"]), jax.random.fold_in(key, i)),
                          np.float64).mean(axis=1) for i, b in enumerate(batches)]
  per_block = np.concatenate(per_block)
  means = per_block.mean(0)
  gap = max(abs(means[n] - result[f"brier{n + 1}"]) for n in range(4))
  if gap > 1e-9:
    sys.exit(f"brier_reference.py: per-block means differ from evaluate_brier's by {gap:.3g} ({kind})")
  return result, per_block, seconds


def _aggregate(per_block_Rx4):
  """Means and jackknife errors of per-block values (every block has the same number of positions)."""
  acc = brier.BrierAccumulator()
  acc.update(per_block_Rx4[:, None, :])
  return acc.result()


def _paired_se(ours_Rx4, ref_Rx4):
  """Jackknife SE of (ours - ref) for Brier-1..4 and BrierLM over shared blocks."""
  r = len(ours_Rx4)
  loo = lambda x: (x.sum(0)[None] - x) / (r - 1)
  a, b = loo(ours_Rx4), loo(ref_Rx4)
  d = np.concatenate([a - b, (brier.brierlm(a) - brier.brierlm(b))[:, None]], axis=1)
  dev = d - d.mean(0)
  return np.sqrt((r - 1) / r * np.sum(dev * dev, axis=0))


def _table(label, ours, ref, paired_se):
  scale = lambda n: 1.0 if n == "brierlm" else 100.0
  lines = [f"**{label}** ({ours['num_rows']} blocks of {ours['block_length']} tokens, "
           f"{ours['num_positions']} positions; Brier-n x100)", "",
           "| metric | calm_jax | reference | diff | z | paired z |", "|---|---|---|---|---|---|"]
  zs = {}
  for i, n in enumerate(NAMES):
    s = scale(n)
    diff = ours[n] - ref[n]
    z = abs(diff) / max(np.hypot(ours[f"{n}_se"], ref[f"{n}_se"]), 1e-12)
    zp = abs(diff) / max(paired_se[i], 1e-12)
    zs[n] = (float(z), float(zp))
    lines.append(f"| {n} | {s * ours[n]:.3f} ± {s * ours[f'{n}_se']:.3f} | {s * ref[n]:.3f} ± "
                 f"{s * ref[f'{n}_se']:.3f} | {s * diff:+.3f} | {z:.2f} | {zp:.2f} |")
  return "\n".join(lines), zs


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, default=256, help="eval blocks per model")
  parser.add_argument("--block_length", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=16, help="calm_jax eval batch")
  parser.add_argument("--models", default="energy,llama", help="comma list of energy, llama")
  parser.add_argument("--lm_scale", type=float, default=12.0, help="baseline lm_head multiplier")
  parser.add_argument("--head_scale", type=float, default=1.0, help="CALM head output-layer multiplier")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
  parser.add_argument("--json", default="", help="also write the numbers here")
  args = parser.parse_args()
  models = [m for m in args.models.split(",") if m]
  if not set(models) <= {"energy", "llama"}:
    sys.exit(f"brier_reference.py: --models takes energy and/or llama; got {args.models!r}")
  ref_dir, ref_py = _reference_env()
  env = dict(os.environ, CALM_REFERENCE_DIR=ref_dir, CUDA_VISIBLE_DEVICES="")
  out = args.out or tempfile.mkdtemp(prefix="brier_reference_")
  os.makedirs(out, exist_ok=True)

  _run_driver(ref_py, env, "create", out, "--head-scale", str(args.head_scale), "--lm-scale", str(args.lm_scale))
  loaded = {}
  if "energy" in models:
    cfg, p, ae_cfg, ae_p = interop.import_energy(os.path.join(out, "energy"))
    loaded["energy"] = ("energy", cfg, p, ae_cfg, ae_p)
  if "llama" in models:
    cfg, p = interop.import_transformer(os.path.join(out, "llama"))
    loaded["llama"] = ("transformer", cfg, p, None, None)

  tokens, ours = {}, {}
  for i, (name, (kind, cfg, p, ae_cfg, ae_p)) in enumerate(loaded.items()):
    t0 = time.perf_counter()
    tokens[name] = _own_samples(kind, cfg, p, ae_cfg, ae_p, args.blocks, args.block_length, args.seed + 10 * i)
    print(f"# {name}: sampled {tokens[name].shape} in {time.perf_counter() - t0:.1f}s, "
          f"{len(np.unique(tokens[name]))} distinct tokens", file=sys.stderr)
    ours[name] = _ours(kind, cfg, p, ae_cfg, ae_p, tokens[name], args.batch_size, args.seed + 10 * i + 1)
    print(f"# {name}: calm_jax evaluate_brier {ours[name][2]:.1f}s", file=sys.stderr)
  np.savez(os.path.join(out, "tokens.npz"), **tokens)
  _run_driver(ref_py, env, "eval", out, "--seed", str(args.seed))
  ref_blocks = dict(np.load(os.path.join(out, "ref_brier.npz")))

  labels = {"energy": "CALM (EnergyTransformer, K = 4): eval_brier",
            "llama": "Baseline (LlamaForCausalLM): train_ar.py estimator ('lowvar')"}
  print(f"machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), jax {jax.__version__} "
        f"on {jax.devices()[0].platform}; fp32; seed {args.seed}; folder {out}\n")
  report = {}
  for name in loaded:
    result, per_block, _ = ours[name]
    ref = dict(_aggregate(ref_blocks[name]), block_length=args.block_length)
    text, zs = _table(labels[name], result, ref, _paired_se(per_block, ref_blocks[name]))
    print(text + "\n")
    report[name] = {"calm_jax": {n: result[n] for n in NAMES} | {f"{n}_se": result[f"{n}_se"] for n in NAMES},
                    "reference": {n: ref[n] for n in NAMES} | {f"{n}_se": ref[f"{n}_se"] for n in NAMES},
                    "z": {n: v[0] for n, v in zs.items()}, "paired_z": {n: v[1] for n, v in zs.items()},
                    "num_blocks": int(result["num_rows"]), "num_positions": int(result["num_positions"])}
  if args.json:
    evaluate.write_json(args.json, report)


if __name__ == "__main__":
  main()
