"""Generation throughput of calm_jax against the reference (a script, not a test).

  python benchmarks/generation.py                      # calm_jax only
  python benchmarks/generation.py --generative_heads=energy,diffusion,flow --reference=no  # per head
  CALM_REFERENCE_DIR=/work/ref CALM_REFERENCE_PYTHON=/work/refvenv/bin/python \\
      python benchmarks/generation.py --max_new_tokens=64

CALM (K = 4) and the baseline share one backbone size; both get random weights
(the energy head's zero-initialised output layer is randomised so that draws
differ, and EOS is an id the models never produce, so every row runs to
max_new_tokens).  For each batch size (1, 32) and temperature (1, 1/2 with the
batch approximation, N = 200) the script reports generated tokens per second,
prefill included, compilation excluded (best of --repeats).

With the reference available, the same CALM weights are exported with
``interop.export_energy`` (and the baseline's with ``export_transformer``) and
timed under the reference's own ``generate()`` (``CALM.generate`` with its
``temperature_sampling``; the baseline with Hugging Face
``LlamaForCausalLM.generate(do_sample=True, top_k=0)``) in a subprocess, one
warm-up call first, on the same kind of device as JAX (``--reference_device``).  Results go to stdout as a Markdown table.

``--generative_heads`` times CALM with each generative head (the same backbone and
autoencoder weights; each head's zero-initialised layers randomised; diffusion
100 DDPM steps and flow 10 midpoint steps unless ``--diffusion_steps`` /
``--flow_steps``).  The reference is timed for the energy head only (its
diffusion and flow samplers hard-code ``.cuda()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import machine  # noqa: E402  (benchmarks/)

from calm_jax import interop, models  # noqa: E402
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig  # noqa: E402
from calm_jax.generation import generate as gen  # noqa: E402

_REFERENCE_DRIVER = r"""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.environ["CALM_REFERENCE_DIR"])
from models.modeling_energy import EnergyTransformer
from transformers import LlamaForCausalLM
folder, spec = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
dev = torch.device(spec["device"])
calm = EnergyTransformer.from_pretrained(os.path.join(folder, "calm")).eval().float().to(dev)
llama = LlamaForCausalLM.from_pretrained(os.path.join(folder, "baseline")).eval().float().to(dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
rows = []
for case in spec["cases"]:
  b, t, kind = case["batch"], case["temperature"], case["kind"]
  ids = torch.from_numpy(np.load(os.path.join(folder, f"prompts_{b}.npy"))).long().to(dev)
  def run():
    with torch.no_grad():
      if kind == "calm":
        return calm.generate(ids, max_length=ids.shape[1] + spec["max_new_tokens"], temperature=t)
      return llama.generate(ids, do_sample=True, temperature=t, top_k=0, top_p=1.0,
                            max_new_tokens=spec["max_new_tokens"], min_new_tokens=spec["max_new_tokens"],
                            pad_token_id=spec["pad_id"])
  run()
  best = float("inf")
  for _ in range(spec["repeats"]):
    sync(); t0 = time.perf_counter(); out = run(); sync(); best = min(best, time.perf_counter() - t0)
  rows.append(dict(case, seconds=best, tokens=b * spec["max_new_tokens"], out_len=int(out.shape[1])))
print("RESULT" + json.dumps(rows))
"""


def build_models(args):
  vocab = args.vocab
  bb = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                   num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                   max_position_embeddings=4096)
  ae_cfg = AutoencoderConfig(vocab_size=vocab, hidden_size=args.hidden // 2, intermediate_size=args.hidden,
                             latent_size=32, patch_size=4)
  cfg = EnergyConfig(backbone=bb, patch_size=4, latent_size=32, noise_size=16, num_mlp_layers=2)
  base_cfg = TransformerConfig(backbone=bb)
  init = jax.jit(models.init_params, static_argnums=0)
  key = jax.random.key(0)
  ae_params, params, base_params = init(ae_cfg, key), init(cfg, jax.random.fold_in(key, 1)), init(
      base_cfg, jax.random.fold_in(key, 2))
  head = params["generative_head"]["final_linear_1"]
  head["kernel"] = jax.random.normal(jax.random.fold_in(key, 3), head["kernel"].shape) * 0.05
  emb = ae_params["encoder"]["embed_tokens"]
  emb["embedding"] = emb["embedding"] * 20.0   # a confident decoder: T = 1/2 finds repeated chunks
  return (cfg, params, ae_cfg, ae_params), (base_cfg, base_params)


def with_head(cfg, params, head, args):
  """The same CALM (backbone, compression) with another generative head: fresh head parameters whose
  zero-initialised kernels (adaLN, output) are randomised so that draws differ."""
  if head == "energy":
    return cfg, params
  cfg = cfg.replace(head=head, diffusion_sampling_steps=args.diffusion_steps,
                    flow_sampling_steps=args.flow_steps)
  fresh = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(5))
  keys = iter(jax.random.split(jax.random.key(6), 64))
  zero_kernel = lambda path, x: jax.tree_util.keystr(path).endswith("['kernel']") and not bool(x.any())
  hp = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.normal(next(keys), x.shape) * 0.05 if zero_kernel(path, x) else x,
      fresh["generative_head"])
  return cfg, dict(params, generative_head=hp)


def time_jax(kind, cfg, params, prompts, settings, repeats, eos_id, pad_id, ae=(None, None)):
  best, compile_s = float("inf"), None
  for r in range(repeats + 1):   # the first call compiles; its decode time is not counted
    out = gen.generate(kind, cfg, params, prompts, jax.random.key(r), settings, eos_id=eos_id, pad_id=pad_id,
                       ae_cfg=ae[0], ae_params=ae[1])
    if r == 0:
      compile_s = out.compile_seconds
    else:
      best = min(best, out.seconds)
    # Every row runs to max_new_tokens (EOS is out of range); a sampled PAD is dropped from the text,
    # so num_tokens may be a little lower than the positions generated, which is what is counted.
    assert out.num_tokens > 0.9 * len(prompts) * settings.max_new_tokens, out.num_tokens
  return best, compile_s


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--batches", default="1,32")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--generative_heads", default="energy",
                 help="CALM's generative heads to time, comma-separated (energy,diffusion,flow)")
  p.add_argument("--diffusion_steps", type=int, default=100)
  p.add_argument("--flow_steps", type=int, default=10)
  p.add_argument("--reference", choices=["auto", "yes", "no"], default="auto")
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the reference")
  p.add_argument("--reference_device", choices=["auto", "cpu", "cuda"], default="auto",
                 help="the reference's torch device (auto: cuda when JAX runs on a GPU, else cpu)")
  args = p.parse_args()

  (cfg, params, ae_cfg, ae_params), (base_cfg, base_params) = build_models(args)
  eos_id, pad_id = args.vocab + 7, args.vocab - 1   # EOS never produced: every row runs to the end
  batches = [int(b) for b in args.batches.split(",")]
  rng = np.random.default_rng(0)
  prompts = {b: rng.integers(0, args.vocab - 1, (b, args.prompt_len)).astype(np.int64) for b in batches}
  head_names = args.generative_heads.split(",")
  cases = [dict(kind="calm", head=h, batch=b, temperature=t) for h in head_names for b in batches
           for t in (1.0, 0.5)]
  cases += [dict(kind="baseline", head="", batch=b, temperature=t) for b in batches for t in (1.0, 0.5)]
  calms = {h: with_head(cfg, params, h, args) for h in head_names}

  print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0].platform}")
  print(f"# {machine.describe()} (before)", flush=True)
  print(f"# model: D={args.hidden}, {args.layers} layers, V={args.vocab}, CALM K=4 (AE D={args.hidden // 2}); "
        f"prompt {args.prompt_len} tokens, {args.max_new_tokens} new tokens")
  for c in cases:
    settings = gen.GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=c["temperature"],
                                      method="batch", num_candidates=200)
    if c["kind"] == "calm":
      h_cfg, h_params = calms[c["head"]]
      s, cs = time_jax("energy", h_cfg, h_params, list(prompts[c["batch"]]), settings, args.repeats, eos_id,
                       pad_id, (ae_cfg, ae_params))
    else:
      s, cs = time_jax("transformer", base_cfg, base_params, list(prompts[c["batch"]]), settings, args.repeats,
                       eos_id, pad_id)
    c.update(jax_seconds=s, jax_compile=cs, jax_tps=c["batch"] * args.max_new_tokens / s)
    print(f"  jax {c['kind']:8s} {c['head']:9s} B={c['batch']:3d} T={c['temperature']}: "
          f"{c['jax_tps']:10.1f} tok/s "
          f"(compile {cs:.1f}s)", flush=True)

  ref_dir = os.environ.get("CALM_REFERENCE_DIR")
  ref_py = os.environ.get("CALM_REFERENCE_PYTHON", "/work/refvenv/bin/python")
  use_ref = args.reference == "yes" or (args.reference == "auto" and ref_dir and os.path.exists(ref_py))
  ref_device = args.reference_device
  if ref_device == "auto":   # the same kind of device on both sides: a like-for-like comparison
    ref_device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  ref_cases = [c for c in cases if c["head"] in ("energy", "")]
  if use_ref:
    with tempfile.TemporaryDirectory() as tmp:
      interop.export_energy(os.path.join(tmp, "calm"), cfg, params, ae_cfg, ae_params, pad_token_id=pad_id,
                            eos_token_id=eos_id)
      interop.export_transformer(os.path.join(tmp, "baseline"), base_cfg, base_params, pad_token_id=pad_id,
                                 eos_token_id=eos_id)
      for b, arr in prompts.items():
        np.save(os.path.join(tmp, f"prompts_{b}.npy"), arr)
      spec = dict(cases=[{k: c[k] for k in ("kind", "batch", "temperature")} for c in ref_cases],
                  max_new_tokens=args.max_new_tokens, repeats=args.repeats, pad_id=pad_id, threads=args.threads,
                  device=ref_device)
      env = dict(os.environ)
      if ref_device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
      r = subprocess.run([ref_py, "-c", _REFERENCE_DRIVER, tmp, json.dumps(spec)], capture_output=True,
                         text=True, env=env)
      if r.returncode:
        sys.exit("reference run failed:\n" + r.stderr[-3000:])
      rows = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))[6:])
    for c, row in zip(ref_cases, rows):
      c.update(ref_seconds=row["seconds"], ref_tps=row["tokens"] / row["seconds"])

  print("\n| model | head | batch | T | calm_jax tok/s | reference tok/s | speed-up |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for c in cases:
    t = "1" if c["temperature"] == 1.0 else "1/2 (N=200)" if c["kind"] == "calm" else "1/2"
    ref = f"{c['ref_tps']:.1f}" if "ref_tps" in c else "-"
    speed = f"{c['jax_tps'] / c['ref_tps']:.1f}x" if "ref_tps" in c else "-"
    print(f"| {c['kind']} | {c['head'] or '-'} | {c['batch']} | {t} | {c['jax_tps']:.1f} | {ref} | {speed} |")
  print(f"\n# load average at the end: {os.getloadavg()[0]:.1f}; {machine.describe()}")


if __name__ == "__main__":
  main()
