"""The reference side of benchmarks/train_dynamics.py: trains the authors' PyTorch models as the HF Trainer does.

  CALM_REFERENCE_DIR=/work/ref /work/refvenv/bin/python benchmarks/train_dynamics_reference.py \\
      --kind=autoencoder --folder=W --batches=B.npy [--draws=D.npz] --dtype=float32 --accum=1 --out=R.npz

Nothing of the reference's code is copied: its classes are imported from
``CALM_REFERENCE_DIR`` and loaded with ``from_pretrained`` from a folder that
calm_jax exported.  The optimizer step is the HF Trainer's (transformers 4.43,
``Trainer.create_optimizer`` / ``training_step``), built from its own helpers:

* parameter groups from ``Trainer.get_decay_parameter_names`` (norm layers in
  ``ALL_LAYERNORM_LAYERS``, to which the reference adds ``LlamaRMSNorm``, and
  biases get no decay), trainable parameters only; ``torch.optim.AdamW``
  (``adamw_torch``) with b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1;
* ``get_scheduler('constant_with_warmup', num_warmup_steps=W)``, stepped after
  every optimizer step;
* per micro-batch ``loss / accum`` backward (summed gradients), then
  ``clip_grad_norm_(1.0)``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad``;
* ``--dtype=bfloat16``: forward under ``torch.autocast('cpu', torch.bfloat16)``
  (the Trainer's ``--bf16``), every module in training mode.  ``float32``: the
  autoencoder's encoder (which casts its embeddings to bf16 in training mode) in
  eval mode; it has no dropout, so nothing else changes.

``--draws``: the random draws calm_jax made, in order; ``torch.rand_like``,
``randn_like``, ``rand``, ``randn`` and ``nn.functional.dropout`` (p > 0) then
return / apply them instead of drawing, and each step must consume exactly the
draws calm_jax made in that step.  Writes losses (mean over micro-batches, as
calm_jax logs), learning rates and gradient norms (before clipping) to ``--out``;
prints the parameter-group sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.environ.get("CALM_REFERENCE_DIR", "/work/ref"))

from models.modeling_autoencoder import Autoencoder  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402
from transformers import LlamaForCausalLM, Trainer, get_scheduler  # noqa: E402


class Draws:
  """calm_jax's draws, handed out in order; a shape mismatch or a leftover is an error."""

  def __init__(self, path: str):
    z = np.load(path)
    self.counts = z["counts"]
    self.arrays = [z[f"d{j}"] for j in range(int(self.counts.sum()))]
    self.next = 0

  def take(self, numel: int, what: str) -> np.ndarray:
    if self.next >= len(self.arrays):
      raise RuntimeError(f"{what}: calm_jax made no more draws (used {self.next})")
    a = self.arrays[self.next]
    if a.size != numel:
      raise RuntimeError(f"{what}: draw {self.next} has {a.size} numbers (shape {a.shape}), need {numel}")
    self.next += 1
    return a


def install(draws: Draws) -> None:
  def tensor(a, shape, dtype, device=None):
    return torch.from_numpy(np.ascontiguousarray(a).reshape(shape)).to(dtype=dtype or torch.float32)

  def rand_like(x, *, dtype=None, **kw):
    return tensor(draws.take(x.numel(), "rand_like"), x.shape, dtype or x.dtype)

  def randn_like(x, *, dtype=None, **kw):
    return tensor(draws.take(x.numel(), "randn_like"), x.shape, dtype or x.dtype)

  def shape_of(size):
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)

  def rand(*size, dtype=None, device=None, **kw):
    s = shape_of(size)
    return tensor(draws.take(int(np.prod(s)), "rand"), s, dtype)

  def randn(*size, dtype=None, device=None, **kw):
    s = shape_of(size)
    return tensor(draws.take(int(np.prod(s)), "randn"), s, dtype)

  orig_dropout = torch.nn.functional.dropout

  def dropout(x, p=0.5, training=True, inplace=False):
    if not training or p == 0:
      return orig_dropout(x, p, training, inplace)
    keep = tensor(draws.take(x.numel(), "dropout"), x.shape, x.dtype)
    return x * keep / (1.0 - p)

  torch.rand_like, torch.randn_like, torch.rand, torch.randn = rand_like, randn_like, rand, randn
  torch.nn.functional.dropout = dropout


def load(kind: str, folder: str, dtype: str):
  if kind == "autoencoder":
    m = Autoencoder.from_pretrained(folder)
    # from_pretrained leaves the decoder's output matrix a separate copy of the embedding (untied);
    # the authors train from scratch (``_from_config``), where __init__ ties the two.  Tie them again.
    m.decoder.lm_head_weight = m.encoder.embed_tokens.weight
    m.train()
    if dtype == "float32":
      m.encoder.eval()
  elif kind == "energy":
    m = EnergyTransformer.from_pretrained(folder)
    m.train()
    if dtype == "float32":
      m.ae_model.eval()
  else:
    m = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    m.train()
  return m.float()


def optimizer(model, lr: float, warmup: int, weight_decay: float = 0.1):
  decay = set(Trainer.get_decay_parameter_names(None, model))
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
  sizes = [sum(p.numel() for p in g["params"]) for g in groups]
  no_decay = sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n, _ in named if n not in decay})
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
  return opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=warmup), sizes, no_decay


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--kind", required=True, choices=("autoencoder", "energy", "transformer"))
  ap.add_argument("--folder", required=True)
  ap.add_argument("--batches", required=True)
  ap.add_argument("--draws")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--accum", type=int, default=1)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--warmup", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  torch.manual_seed(args.seed)
  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
  model = load(args.kind, args.folder, args.dtype)
  opt, sched, sizes, no_decay = optimizer(model, args.lr, args.warmup)
  print(f"decayed {sizes[0]} / not decayed {sizes[1]} parameters; no decay: {no_decay}")
  batches = torch.from_numpy(np.load(args.batches).astype(np.int64))
  draws = Draws(args.draws) if args.draws else None
  if draws is not None:
    install(draws)
  ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else contextlib.nullcontext
  params = [p for p in model.parameters() if p.requires_grad]
  losses, lrs, norms = [], [], []
  for step in range(batches.shape[0]):
    start = draws.next if draws is not None else 0
    lrs.append(sched.get_last_lr()[0])
    total = 0.0
    for i in range(args.accum):
      mb = batches[step, i::args.accum].contiguous()   # calm_jax's micro-batch i: rows i, i+m, ...
      with ctx():
        loss = model(input_ids=mb, labels=mb).loss
      (loss / args.accum).backward()
      total += float(loss) / args.accum
    norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(total)
    if draws is not None and draws.next - start != int(draws.counts[step]):
      raise RuntimeError(f"step {step}: used {draws.next - start} draws, calm_jax made {draws.counts[step]}")
  np.savez(args.out, losses=np.array(losses), lrs=np.array(lrs), grad_norms=np.array(norms),
           group_sizes=np.array(sizes))
  print(f"ok {args.kind} {len(losses)} steps, last loss {losses[-1]:.6f}")


if __name__ == "__main__":
  main()
