"""The tiny autoencoder (experiments/autoencoder.py:tiny) at Llama-3's vocabulary: step time and memory.

  python benchmarks/large_vocab.py                 # blocked (automatic) and plain, each in its own process
  python benchmarks/large_vocab.py --block=0 --one # one process, the plain [tokens, V] path only

Builds the tiny AE's model config with ``vocab_size=128257`` (or ``--vocab``), jits
``calm_jax.cost.xla_cost.make_train_step`` (value_and_grad of the AE loss + clipped AdamW) on
``--batch x --seq`` random tokens (32 x 64 = the tiny run's 2048 tokens), and reports: the compiled
step's XLA temporaries (``memory_analysis().temp_size_in_bytes``), median step time, and the process's
peak resident memory (``ru_maxrss``) after the timed steps.  ``--block``: vocabulary block width
(``calm_jax.models.losses.vocab_blocks``; 0 = the plain path, default = the automatic choice).
Without ``--one`` it runs each variant in a fresh process (so that peak RSS is per variant),
alternating ``--rounds`` times, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_one(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from calm_jax import models  # pylint: disable=import-outside-toplevel
  from calm_jax.configs import AutoencoderConfig  # pylint: disable=import-outside-toplevel
  from calm_jax.cost import xla_cost  # pylint: disable=import-outside-toplevel
  from calm_jax.models import losses  # pylint: disable=import-outside-toplevel
  from experiments import autoencoder as ae_exp  # pylint: disable=import-outside-toplevel

  model = dict(ae_exp.get_config("tiny").model)
  model.update(vocab_size=args.vocab, dtype=args.dtype)
  cfg = AutoencoderConfig.from_dict(model)
  block = None if args.block < 0 else args.block
  with losses.vocab_blocks(block):
    step, tx = xla_cost.make_train_step("autoencoder", cfg)
    params = models.init_params(cfg, jax.random.key(0))
    opt_state = tx.init(params)
    tokens = jax.random.randint(jax.random.key(2), (args.batch, args.seq), 0, args.vocab, jnp.int32)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, None, tokens, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  times, losses_ = [], []
  for i in range(2 + args.iters):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, None, tokens, jax.random.key(i))
    loss.block_until_ready()
    if i >= 2:
      times.append(time.perf_counter() - t0)
    losses_.append(float(loss))
  used = losses.vocab_block_size(args.vocab, args.batch * args.seq) if block is None else block
  return dict(block=used, vocab=args.vocab, dtype=args.dtype, tokens=args.batch * args.seq,
              temp_gib=mem.temp_size_in_bytes / 2**30, arg_gib=mem.argument_size_in_bytes / 2**30,
              step_s=statistics.median(times), times=times, compile_s=compile_s,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
              first_loss=losses_[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--vocab", type=int, default=128257)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--block", type=int, default=-1, help="-1 automatic, 0 plain, >0 forced block width")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--one", action="store_true", help="measure one variant in this process, print JSON")
  args = ap.parse_args()
  if args.one:
    print(json.dumps(run_one(args)), flush=True)
    return
  import machine  # pylint: disable=import-outside-toplevel
  print(f"# {machine.describe()} (before)", flush=True)
  rows = []
  for r in range(args.rounds):
    for block in ((-1, 0) if r % 2 == 0 else (0, -1)):
      cmd = [sys.executable, os.path.abspath(__file__), "--one", f"--block={block}", f"--vocab={args.vocab}",
             f"--batch={args.batch}", f"--seq={args.seq}", f"--dtype={args.dtype}", f"--iters={args.iters}"]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE))
      res = json.loads(out.stdout.strip().splitlines()[-1])
      res["round"] = r
      print(json.dumps(res), file=sys.stderr, flush=True)
      rows.append(res)
  print(f"# {machine.describe()} (after)")
  print("| path | V | tokens | XLA temporaries (GiB) | step (s), median per round | peak RSS (GB) | first loss |\n"
        "|---|---|---|---|---|---|---|")
  for label, sel in (("plain", lambda x: x["block"] == 0), ("blocked", lambda x: x["block"] != 0)):
    rs = [x for x in rows if sel(x)]
    if not rs:
      continue
    name = label if label == "plain" else f"blocked (c={rs[0]['block']})"
    print(f"| {name} | {rs[0]['vocab']} | {rs[0]['tokens']} | {rs[0]['temp_gib']:.3f} | "
          f"{' / '.join('%.3f' % x['step_s'] for x in rs)} | {max(x['peak_rss_gb'] for x in rs):.2f} | "
          f"{rs[0]['first_loss']:.6f} |")


if __name__ == "__main__":
  main()
