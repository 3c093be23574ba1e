"""End to end on a laptop CPU: data -> autoencoder -> CALM and the baseline -> evaluation.

  python -m launch.quickstart                 # workdirs under ./runs/quickstart
  python -m launch.quickstart --root=/tmp/qs  # elsewhere

Stages (each a plain ``calm_jax.training.train.run`` of a registry experiment; running the
command again resumes an interrupted stage and only re-evaluates finished ones):

  1. the embedded corpus (Python's own documentation) and a 1024-token BPE,
     packed into blocks (``experiments/*.py:tiny`` set ``data.auto_prepare``);
  2. the tiny autoencoder (K=4): held-out token accuracy, clean and with noise
     on the latent (the target is >= 99%), as a table over noise levels;
  3. tiny CALM on the frozen autoencoder: held-out energy loss and BrierLM;
  4. the tiny Transformer baseline: held-out cross-entropy and BrierLM;
  5. a few sampled continuations of both, and ``summary.json`` under ``--root``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads
from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_string("root", "runs/quickstart", "Parent directory of the three workdirs.", **d)
  flags.DEFINE_multi_string(
      "prompt", ["The following example shows how to", "This module provides", "If the file does not exist,"],
      "Prompts for the sample continuations (repeatable).", **d)
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens per sampled continuation.", **d)
  flags.DEFINE_float("temperature", 0.5, "Sampling temperature of the continuations (CALM: 1/n, batch "
                     "method).", **d)


def _autoencoder_table(workdir: str, data_dir: str) -> dict:
  """Reconstruction accuracy at latent noise sigma in {0, .1, .2, .3, .5} on 512 held-out blocks."""
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax import data, loading  # pylint: disable=import-outside-toplevel
  from calm_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel

  trained = loading.load_trained(workdir)
  _, pad_id = loading.special_ids(trained)
  batches = data.make_eval_iterator(data_dir, "valid", global_batch_size=32)
  result = evaluate.evaluate_autoencoder(trained.cfg, trained.params, batches, jax.random.key(0),
                                         pad_id=pad_id, progress=False, num_batches=16)
  print(evaluate.format_autoencoder(result))
  return result


def _continuations(workdir: str, prompts: list[str], max_new_tokens: int, temperature: float) -> list[str]:
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.generation import generate  # pylint: disable=import-outside-toplevel

  trained = loading.load_trained(workdir)
  settings = generate.GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature)
  texts, gen = generate.generate_text(trained, prompts, jax.random.key(0), settings)
  for prompt, text in zip(prompts, texts):
    print(f"  {prompt!r} -> {text!r}")
  print(f"  ({gen.num_tokens} tokens in {gen.seconds:.2f} s after {gen.compile_seconds:.1f} s of "
        "compilation)")
  return texts


def _brier_line(name: str, r: dict) -> str:
  """BrierLM with Brier-1..4 and their errors, the block length, and "at chance" when a Brier-n <= 0."""
  se = lambda n: f" ± {100 * r[f'eval/brier{n}_se']:.2f}" if f"eval/brier{n}_se" in r else ""
  cells = "  ".join(f"Brier-{n} {100 * r[f'eval/brier{n}']:.2f}{se(n)}" for n in range(1, 5))
  block = f", blocks of {int(r['eval/block_length'])} tokens" if "eval/block_length" in r else ""
  line = f"{name:12s} BrierLM {r['eval/brierlm']:.2f} ± {r['eval/brierlm_se']:.2f}  (x100: {cells}{block})"
  if any(r[f"eval/brier{n}"] <= 0 for n in range(1, 5)):
    ref = (f"; the reference's formula, which clips only the product, gives "
           f"{r['eval/brierlm_reference']:.2f}" if "eval/brierlm_reference" in r else "")
    line += f"\n{'':12s} at chance: a Brier-n <= 0, so BrierLM is 0{ref}"
  if r["eval/brier1"] > 0 and r.get("eval/brier1_se", 0) > 0:
    line += (f"\n{'':12s} Brier-1 is {r['eval/brier1'] / r['eval/brier1_se']:.1f} standard errors above 0 "
             "(chance is 0): next-chunk predictions better than chance")
  return line


def main(argv=None):
  """``python -m launch.quickstart``; exit statuses as ``launch.train`` (launch/cli.py)."""
  argv = list(sys.argv if argv is None else argv)
  fv = cli.parse(_define, argv, __doc__, "launch.quickstart")
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from calm_jax.training import checkpoint, metrics, train  # pylint: disable=import-outside-toplevel

  with cli.errors(train.ConfigError, DataError, checkpoint.CheckpointError, OSError):
    try:
      _quickstart(fv)
    except metrics.NonFiniteError as e:
      cli.fail(e, cli.EXIT_NONFINITE)
    except train.Preempted as e:
      again = " ".join(shlex.quote(a) for a in ["python", "-m", "launch.quickstart", *argv[1:]])
      print(f"{e}; resume with: {again}", file=sys.stderr, flush=True)
      raise SystemExit(cli.EXIT_PREEMPTED) from None


def _quickstart(fv) -> None:
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel

  root = os.path.abspath(fv.root)
  dirs = {k: os.path.join(root, k) for k in ("autoencoder", "calm", "transformer")}
  t0 = time.perf_counter()
  results = {}

  print(f"== 1+2. autoencoder (K=4) -> {dirs['autoencoder']}")
  results["autoencoder"] = train.run(registry.get_config("ae_tiny"), dirs["autoencoder"])
  calm_cfg = registry.get_config("calm_tiny")
  with calm_cfg.unlocked():
    calm_cfg.ae_workdir = dirs["autoencoder"]
  print(f"== 3. CALM on the frozen autoencoder -> {dirs['calm']}")
  results["calm"] = train.run(calm_cfg, dirs["calm"])
  print(f"== 4. Transformer baseline -> {dirs['transformer']}")
  results["transformer"] = train.run(registry.get_config("transformer_tiny"), dirs["transformer"])

  stamps = {"train_seconds": time.perf_counter() - t0}
  ae, calm, tf = results["autoencoder"], results["calm"], results["transformer"]
  print("== 5. evaluation")
  print(f"autoencoder  held-out token accuracy {ae['eval/token_acc']:.4%} (clean), "
        f"{ae['eval/token_acc_noisy']:.4%} (latent + N(0, 0.3^2)), "
        f"{ae['eval/token_acc_posterior']:.4%} (posterior sample)")
  ae_table = _autoencoder_table(dirs["autoencoder"], registry.get_config("ae_tiny").data.dir)
  print(f"CALM         held-out energy loss {calm['eval/energy_loss']:.4f}")
  print(f"Transformer  held-out cross-entropy {tf['eval/ce']:.4f} nats/token "
        f"(perplexity {tf['eval/perplexity']:.1f})")
  for name, r in (("CALM", calm), ("Transformer", tf)):
    if "eval/brierlm" in r:
      print(_brier_line(name, r))
  samples = {}
  for name in ("calm", "transformer"):
    print(f"{name} continuations (T={fv.temperature:g}):")
    samples[name] = _continuations(dirs[name], list(fv.prompt), fv.max_new_tokens, fv.temperature)
  total = time.perf_counter() - t0
  summary = {"seconds": total, **stamps, "autoencoder": ae, "autoencoder_noise_table": ae_table, "calm": calm,
             "transformer": tf, "prompts": list(fv.prompt), "samples": samples}
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  print(f"quickstart done in {total:.0f} s; workdirs and summary.json under {root}")
  if ae["eval/token_acc"] < 0.99:
    print(f"WARNING: the autoencoder reached {ae['eval/token_acc']:.2%} < 99% held-out token accuracy")


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  main()
