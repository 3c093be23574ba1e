"""End to end on a laptop CPU: data -> autoencoder -> CALM and the baseline -> evaluation.

  python -m launch.quickstart                 # workdirs under ./runs/quickstart
  python -m launch.quickstart --root=/tmp/qs  # elsewhere

Stages (each a plain ``calm_jax.train.run`` of a registry experiment; running the
command again resumes an interrupted stage and only re-evaluates finished ones):

  1. the embedded corpus (Python's own documentation) and a 1024-token BPE,
     packed into blocks (``experiments/*.py:tiny`` set ``data.auto_prepare``);
  2. the tiny autoencoder (K=4): held-out token accuracy, clean and with noise
     on the latent (the target is >= 99%);
  3. tiny CALM on the frozen autoencoder: held-out energy loss;
  4. the tiny Transformer baseline: held-out cross-entropy;
  5. BrierLM and a few sampled continuations, when ``calm_jax.evaluate`` and
     ``calm_jax.generate`` are installed.
"""

from __future__ import annotations

import importlib
import os
import time

from absl import app, flags

_ROOT = flags.DEFINE_string("root", "runs/quickstart", "Parent directory of the three workdirs.")


def _optional(name: str):
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def main(argv):
  del argv
  from calm_jax import train  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel

  root = os.path.abspath(_ROOT.value)
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

  print("== 5. evaluation")
  ae, calm, tf = results["autoencoder"], results["calm"], results["transformer"]
  print(f"autoencoder  held-out token accuracy {ae['eval/token_acc']:.4%} (clean), "
        f"{ae['eval/token_acc_noisy']:.4%} (latent + N(0, 0.3^2)), "
        f"{ae['eval/token_acc_posterior']:.4%} (posterior sample)")
  print(f"CALM         held-out energy loss {calm['eval/energy_loss']:.4f}")
  print(f"Transformer  held-out cross-entropy {tf['eval/ce']:.4f} nats/token "
        f"(perplexity {tf['eval/perplexity']:.1f})")
  evaluate, generate = _optional("calm_jax.evaluate"), _optional("calm_jax.generate")
  if not (getattr(evaluate, "brierlm_of_workdir", None) and getattr(generate, "continuations_of_workdir", None)):
    # TODO(lead): wire calm_jax.loading.load_trained + evaluate.evaluate_brier + generate.generate_text.
    print("BrierLM and sample continuations: skipped (not wired to calm_jax.evaluate / calm_jax.generate "
          "yet; use python -m launch.evaluate / launch.generate on the workdirs)")
  else:
    for name in ("calm", "transformer"):
      print(f"{name}: BrierLM {evaluate.brierlm_of_workdir(dirs[name])}")
      for text in generate.continuations_of_workdir(dirs[name], num=3):
        print(f"  > {text!r}")
  print(f"quickstart done in {time.perf_counter() - t0:.0f} s; workdirs under {root}")
  if ae["eval/token_acc"] < 0.99:
    print(f"WARNING: the autoencoder reached {ae['eval/token_acc']:.2%} < 99% held-out token accuracy")


if __name__ == "__main__":
  app.run(main)
