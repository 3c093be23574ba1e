"""The reference side of ``benchmarks/brier_reference.py``: builds and evaluates the authors' models.

Runs under a Python with torch and transformers (``CALM_REFERENCE_PYTHON``)
and imports the classes of the reference checkout at ``CALM_REFERENCE_DIR``
(github shaochenze/calm); none of its code is copied here.

  reference_brier_driver.py create OUT [--head-scale S] [--lm-scale S]
      Random reference models (every tensor perturbed, as tests/reference/driver.py
      does), saved with ``save_pretrained`` under OUT/{ae, energy, llama}.  To make
      their samples far from uniform noise, CALM's generative-head output layer is
      multiplied by ``--head-scale`` (the spread of the predicted latents; a random
      model's is tiny) and the baseline's ``lm_head`` by ``--lm-scale`` (sharper
      next-token distributions).
  reference_brier_driver.py eval OUT [--seed N]
      Loads OUT/{energy, llama} with ``from_pretrained`` and evaluates the blocks
      in OUT/tokens.npz ('energy': [R, T] and 'llama': [R, T]) through the
      reference's own evaluation code, one block per forward pass as its
      ``eval_energy.sh`` (``--per_device_eval_batch_size 1``):
        CALM      ``EnergyTransformer.forward(input_ids, labels)`` in eval mode,
                  which returns ``eval_brier``'s brier1..4 (models/modeling_calm.py);
        baseline  ``train_ar.CustomTrainer.compute_loss(model, inputs, return_outputs=True)``
                  (train/train_ar.py), the method its Trainer calls during evaluation.
      Writes OUT/ref_brier.npz: per-block Brier-1..4, [R, 4] per model.  The
      reference's ``compute_metrics`` reports the mean of these per-batch values.

train/train_ar.py imports the ``datasets`` package at module level but only
uses it in ``main()``; when ``datasets`` is not installed a placeholder module
is registered so that ``CustomTrainer`` can be imported.  Everything runs in
fp32 on the CPU (the authors evaluate under ``--bf16`` autocast).
"""

import argparse
import importlib.machinery
import importlib.util
import os
import sys
import time
import types

import numpy as np
import torch

if not os.environ.get("CALM_REFERENCE_DIR"):
  sys.exit("reference_brier_driver.py: set CALM_REFERENCE_DIR to a checkout of github shaochenze/calm")
sys.path.insert(0, os.environ["CALM_REFERENCE_DIR"])

from models.configuration_autoencoder import AutoencoderConfig  # noqa: E402
from models.configuration_calm import CALMConfig  # noqa: E402
from models.modeling_autoencoder import Autoencoder  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

V, K, L = 97, 4, 16


def _perturb(model, seed, scale=0.05):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.startswith("ae_model."):   # the frozen autoencoder stays as loaded
        p.add_(scale * torch.randn(p.shape, generator=g))


def create(out, head_scale, lm_scale):
  torch.manual_seed(0)
  ae = Autoencoder(AutoencoderConfig(vocab_size=V, hidden_size=48, intermediate_size=80, latent_size=L,
                                     patch_size=K, num_encoder_layers=2, num_decoder_layers=2))
  _perturb(ae, 1)
  ae.save_pretrained(f"{out}/ae", safe_serialization=False)   # keeps the tied decoder.lm_head_weight
  cfg = CALMConfig(ae_path=f"{out}/ae", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, latent_size=L, patch_size=K, noise_size=8,
                   num_mlp_layers=2, num_samples=2, max_position_embeddings=256)
  energy = EnergyTransformer(cfg)
  _perturb(energy, 2)
  with torch.no_grad():
    last = energy.generative_head.final_layer.linears[-1]
    last.weight.mul_(head_scale)
    last.bias.mul_(head_scale)
  energy.save_pretrained(f"{out}/energy", safe_serialization=False)
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       rms_norm_eps=1e-6, tie_word_embeddings=False))
  _perturb(llama, 3)
  with torch.no_grad():
    llama.lm_head.weight.mul_(lm_scale)
  llama.save_pretrained(f"{out}/llama")
  print("ok create", out)


def _custom_trainer():
  """train/train_ar.py's CustomTrainer (its Brier estimator lives in compute_loss)."""
  if importlib.util.find_spec("datasets") is None:
    placeholder = types.ModuleType("datasets")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    placeholder.load_dataset = None
    sys.modules["datasets"] = placeholder
  from train.train_ar import CustomTrainer  # pylint: disable=import-outside-toplevel
  return CustomTrainer


@torch.no_grad()
def evaluate(out, seed):
  torch.set_num_threads(1)
  tokens = dict(np.load(f"{out}/tokens.npz"))
  results = {}
  if "energy" in tokens:
    energy = EnergyTransformer.from_pretrained(f"{out}/energy").float().eval()
    torch.manual_seed(seed)
    rows, t0 = [], time.perf_counter()
    for block in tokens["energy"]:
      x = torch.from_numpy(block.astype(np.int64))[None]
      o = energy(input_ids=x, labels=x.clone())
      rows.append([float(o.brier1), float(o.brier2), float(o.brier3), float(o.brier4)])
    results["energy"] = np.asarray(rows)
    print(f"energy: {len(rows)} blocks in {time.perf_counter() - t0:.1f}s", flush=True)
  if "llama" in tokens:
    compute_loss = _custom_trainer().compute_loss
    llama = LlamaForCausalLM.from_pretrained(f"{out}/llama").float().eval()
    torch.manual_seed(seed + 1)
    rows, t0 = [], time.perf_counter()
    for block in tokens["llama"]:
      x = torch.from_numpy(block.astype(np.int64))[None]
      _, o = compute_loss(None, llama, {"input_ids": x, "labels": x.clone()}, return_outputs=True)
      rows.append([float(o.brier1), float(o.brier2), float(o.brier3), float(o.brier4)])
    results["llama"] = np.asarray(rows)
    print(f"llama: {len(rows)} blocks in {time.perf_counter() - t0:.1f}s", flush=True)
  np.savez(f"{out}/ref_brier.npz", **results)
  print("ok eval", out)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("mode", choices=("create", "eval"))
  parser.add_argument("out")
  parser.add_argument("--head-scale", type=float, default=1.0)
  parser.add_argument("--lm-scale", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.mode == "create":
    create(args.out, args.head_scale, args.lm_scale)
  else:
    evaluate(args.out, args.seed)
