"""Times calm_jax's train steps (autoencoder, CALM, baseline) at the fixed configs of bench_configs.py.

  python benchmarks/train_step.py                          # both sizes, fp32, prints a table
  python benchmarks/train_step.py --sizes=small --dtype=bfloat16 --iters=10
  python benchmarks/compare.py                              # side by side with the reference

A step is value_and_grad of ``calm_jax.models.*_loss_fn`` plus the reference's
clipped AdamW (``calm_jax.cost.xla_cost.make_train_step``), jitted once with the
state donated.  Reported: median step time over ``iters`` timed steps (after
two untimed ones, the first compiles), tokens/s = batch x seq / step time,
and MFU = tokens/s x ``flops.train_flops_per_token`` / the matmul peak measured
in the same process (``flops.measure_matmul_peak``, same dtype).

``--serve`` reads one JSON request per stdin line ({"model", "size", "dtype",
"iters"}) and answers one JSON line per request, keeping compiled steps: the
comparison script alternates requests between this and the reference worker.

Like the launch scripts, it restarts itself once with glibc malloc tuned for
XLA:CPU (``calm_jax.hostmem``; ``CALM_JAX_MALLOC=system`` keeps the defaults);
every result says which (``malloc``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_configs as bc  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from calm_jax import hostmem, models  # noqa: E402
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig  # noqa: E402
from calm_jax.cost import flops, xla_cost  # noqa: E402


def build_configs(size: str, dtype: str):
  """(ae_cfg, energy_cfg, transformer_cfg) of a benchmark size; compute in ``dtype``, fp32 parameters."""
  s, v = bc.SIZES[size], bc.vocab(size)
  ae = AutoencoderConfig(vocab_size=v, latent_size=bc.LATENT, patch_size=bc.PATCH, dtype=dtype, **s["ae"])
  bb = LlamaConfig(vocab_size=v, max_position_embeddings=max(2048, s["seq"]), dtype=dtype, **s["backbone"])
  en = EnergyConfig(backbone=bb, patch_size=bc.PATCH, latent_size=bc.LATENT, num_mlp_layers=s["num_mlp_layers"],
                    **bc.HEAD)
  return ae, en, TransformerConfig(backbone=bb)


class Bench:
  """Compiled steps and their state, kept across requests."""

  def __init__(self):
    self._steps = {}
    self._peaks = {}

  def peak(self, dtype: str) -> float:
    """The MFU denominator: ``CALM_BENCH_PEAK_FLOPS`` if set (gpu.sh sets the GPU's bf16 peak),
    else the matmul peak measured in this process."""
    if os.environ.get("CALM_BENCH_PEAK_FLOPS"):
      return float(os.environ["CALM_BENCH_PEAK_FLOPS"])
    if dtype not in self._peaks:
      n = 2048 if jax.default_backend() == "cpu" else 8192
      self._peaks[dtype] = flops.measure_matmul_peak(dtype, n=n, iters=5)
    return self._peaks[dtype]

  def _setup(self, model: str, size: str, dtype: str):
    key = (model, size, dtype)
    if key not in self._steps:
      ae, en, tf = build_configs(size, dtype)
      cfg = {"autoencoder": ae, "energy": en, "transformer": tf}[model]
      step, tx = xla_cost.make_train_step(model, cfg, ae if model == "energy" else None)
      params = models.init_params(cfg, jax.random.key(0))
      ae_params = models.init_params(ae, jax.random.key(1)) if model == "energy" else None
      s = bc.SIZES[size]
      tokens = jax.random.randint(jax.random.key(2), (s["batch"], s["seq"]), 0, bc.vocab(size), jnp.int32)
      context = {"transformer": s["seq"], "energy": s["seq"] // bc.PATCH, "autoencoder": None}[model]
      fpt = flops.train_flops_per_token(model, cfg, ae if model == "energy" else None, context)
      self._steps[key] = dict(step=jax.jit(step, donate_argnums=(0, 1)), params=params,
                              opt_state=tx.init(params), ae_params=ae_params, tokens=tokens, fpt=fpt, n=0)
    return self._steps[key]

  def run(self, model: str, size: str, dtype: str = "float32", iters: int = 5) -> dict:
    st = self._setup(model, size, dtype)
    times = []
    warm = 2 if st["n"] == 0 else 1
    for i in range(warm + iters):
      t0 = time.perf_counter()
      st["params"], st["opt_state"], loss = st["step"](st["params"], st["opt_state"], st["ae_params"],
                                                       st["tokens"], jax.random.key(st["n"]))
      loss.block_until_ready()
      st["n"] += 1
      if i >= warm:
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tok_s = st["tokens"].size / step_s
    peak = self.peak(dtype)
    return dict(impl="calm_jax", model=model, size=size, dtype=dtype, step_s=step_s, tokens_per_s=tok_s,
                flops_per_token=st["fpt"], peak=peak, mfu=flops.mfu(tok_s, st["fpt"], peak),
                loss=float(loss), times=times, malloc=os.environ.get("CALM_JAX_MALLOC", "system"))


def main():
  hostmem.reexec_with_tuned_malloc()
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="small,medium", help=f"of {sorted(bc.SIZES)}")
  ap.add_argument("--models", default=",".join(bc.MODELS))
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (for compare.py)")
  args = ap.parse_args()
  bench = Bench()
  if args.serve:
    for line in sys.stdin:
      if line.strip():
        print(json.dumps(bench.run(**json.loads(line))), flush=True)
    return
  print(f"{'model':<13}{'size':<8}{'dtype':<10}{'step (s)':>10}{'tokens/s':>11}{'MFU':>8}")
  for size in args.sizes.split(","):
    for model in args.models.split(","):
      r = bench.run(model, size, args.dtype, args.iters)
      print(f"{model:<13}{size:<8}{args.dtype:<10}{r['step_s']:>10.3f}{r['tokens_per_s']:>11.0f}{r['mfu']:>8.1%}",
            flush=True)
  print(f"matmul peak ({args.dtype}): {bench.peak(args.dtype) / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
  main()
