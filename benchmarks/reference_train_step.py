"""Times the reference PyTorch train steps (github shaochenze/calm) at the configs of bench_configs.py.

  CALM_REFERENCE_DIR=/work/ref /work/refvenv/bin/python benchmarks/reference_train_step.py
  ... --serve      (JSON requests on stdin, for compare.py)

Needs torch and transformers; imports the reference's classes from
``CALM_REFERENCE_DIR`` (nothing of its code is copied).  Random weights.  A
step is what the HF Trainer does per optimizer step without accumulation:
forward with labels, ``loss.backward()``, ``clip_grad_norm_(1.0)``, AdamW
(torch's default foreach implementation, the reference's hyper-parameters),
``zero_grad``.

Precision: ``float32`` runs everything in fp32.  The reference's AE encoder
casts its embeddings to bf16 whenever it is in training mode (the authors
train with ``--bf16``), so for fp32 the *encoder* module is put in eval mode
(it has no dropout; the autoencoder's own token and latent dropout stay on),
and CALM's frozen autoencoder is in eval mode as the reference intends.
``bfloat16`` runs the step under ``torch.autocast('cpu', bfloat16)`` as the
HF Trainer's ``--bf16`` does, with the models in training mode.
CALM needs an autoencoder folder: one is created with the reference's
``save_pretrained(safe_serialization=False)`` in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("CALM_REFERENCE_DIR", "/work/ref"))

import bench_configs as bc  # noqa: E402
import torch  # noqa: E402
from models.configuration_autoencoder import AutoencoderConfig  # noqa: E402
from models.configuration_calm import CALMConfig  # noqa: E402
from models.modeling_autoencoder import Autoencoder  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


# CALM_BENCH_DEVICE=cuda (benchmarks/gpu.sh) runs the reference's steps on the GPU.
DEVICE = torch.device(os.environ.get("CALM_BENCH_DEVICE", "cpu"))


def _sync():
  if DEVICE.type == "cuda":
    torch.cuda.synchronize()


def _llama_kw(size):
  s = bc.SIZES[size]
  return dict(vocab_size=bc.vocab(size), max_position_embeddings=max(2048, s["seq"]), rms_norm_eps=1e-6,
              **s["backbone"])


def _ae_config(size):
  return AutoencoderConfig(vocab_size=bc.vocab(size), latent_size=bc.LATENT, patch_size=bc.PATCH,
                           num_encoder_layers=2, num_decoder_layers=2, **bc.SIZES[size]["ae"])


def build(model: str, size: str, dtype: str, tmp: str):
  torch.manual_seed(0)
  if model == "autoencoder":
    m = Autoencoder(_ae_config(size))
    m.train()
    if dtype == "float32":
      m.encoder.eval()
    return m
  if model == "energy":
    ae_dir = os.path.join(tmp, f"ae_{size}")
    if not os.path.isdir(ae_dir):
      Autoencoder(_ae_config(size)).save_pretrained(ae_dir, safe_serialization=False)
    m = EnergyTransformer(CALMConfig(ae_path=ae_dir, patch_size=bc.PATCH, latent_size=bc.LATENT,
                                     num_mlp_layers=bc.SIZES[size]["num_mlp_layers"], **bc.HEAD,
                                     **_llama_kw(size)))
    m.train()
    if dtype == "float32":
      m.ae_model.eval()
    return m
  if model == "transformer":
    m = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **_llama_kw(size)))
    m.train()
    return m
  raise ValueError(f"unknown model {model!r}")


class Bench:
  def __init__(self):
    self._tmp = tempfile.mkdtemp(prefix="calm_ref_bench_")
    self._state = {}
    self._peaks = {}

  def peak(self, dtype: str) -> float:
    if dtype not in self._peaks:
      dt = getattr(torch, dtype)
      n = 2048
      if os.environ.get("CALM_BENCH_PEAK_FLOPS"):
        return float(os.environ["CALM_BENCH_PEAK_FLOPS"])
      n = 2048 if DEVICE.type == "cpu" else 8192
      a, b = torch.randn(n, n, dtype=dt, device=DEVICE), torch.randn(n, n, dtype=dt, device=DEVICE)
      a @ b
      best = float("inf")
      for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - t0)
      self._peaks[dtype] = 2.0 * n ** 3 / best
    return self._peaks[dtype]

  def _setup(self, model, size, dtype):
    key = (model, size, dtype)
    if key not in self._state:
      m = build(model, size, dtype, self._tmp).to(DEVICE)
      o = bc.OPTIM
      opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=o["lr"], betas=(o["b1"], o["b2"]),
                              eps=o["eps"], weight_decay=o["weight_decay"])
      s = bc.SIZES[size]
      g = torch.Generator().manual_seed(2)
      ids = torch.randint(0, bc.vocab(size), (s["batch"], s["seq"]), generator=g).to(DEVICE)
      self._state[key] = dict(model=m, opt=opt, ids=ids, n=0)
    return self._state[key]

  def run(self, model: str, size: str, dtype: str = "float32", iters: int = 5) -> dict:
    st = self._setup(model, size, dtype)
    m, opt, ids = st["model"], st["opt"], st["ids"]
    ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    times = []
    warm = 2 if st["n"] == 0 else 1
    for i in range(warm + iters):
      t0 = time.perf_counter()
      with ctx:
        loss = m(input_ids=ids, labels=ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], bc.OPTIM["clip"])
      opt.step()
      opt.zero_grad(set_to_none=True)
      loss = loss.detach()
      _sync()
      st["n"] += 1
      if i >= warm:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return dict(impl="reference", model=model, size=size, dtype=dtype, step_s=step_s,
                tokens_per_s=ids.numel() / step_s, peak=self.peak(dtype), loss=float(loss), times=times,
                threads=torch.get_num_threads())


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="small,medium")
  ap.add_argument("--models", default=",".join(bc.MODELS))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--serve", action="store_true")
  args = ap.parse_args()
  bench = Bench()
  if args.serve:
    for line in sys.stdin:
      if line.strip():
        print(json.dumps(bench.run(**json.loads(line))), flush=True)
    return
  print(f"{'model':<13}{'size':<8}{'dtype':<10}{'step (s)':>10}{'tokens/s':>11}")
  for size in args.sizes.split(","):
    for model in args.models.split(","):
      r = bench.run(model, size, args.dtype, args.iters)
      print(f"{model:<13}{size:<8}{args.dtype:<10}{r['step_s']:>10.3f}{r['tokens_per_s']:>11.0f}", flush=True)


if __name__ == "__main__":
  main()
