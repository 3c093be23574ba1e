"""Generate continuations of text prompts with a trained CALM or baseline model.

  python -m launch.generate --workdir=/runs/calm_m --prompt='The meaning of life is' \\
      --temperature=0.5 --method=batch --num_candidates=200 --max_new_tokens=128

  python -m launch.generate --workdir=/runs/ar_m --prompts_file=prompts.txt --temperature=0.7

--workdir is a training workdir or a reference Hugging Face folder.  CALM's
--method: 'batch' (the paper's approximation, T = 1/n, --num_candidates draws),
'rejection' (exact, T = 1/n) or 'two_stage' (exact, any T in (0, 1]); the
baseline samples softmax(logits / T) for any T > 0.  Prompts run in batches of
--batch_size (ragged lengths are fine); one line of the prompts file is one prompt.

A prompt and --max_new_tokens must fit the model's context
(``model.backbone.max_position_embeddings`` positions; for CALM chunks of K
tokens): a longer prompt is refused (``--long_prompts=refuse``, the default) or
cut from the left to the tokens that fit, with a one-line warning
(``--long_prompts=truncate``).  An autoencoder's workdir is refused (it does not
generate).  Exit status: 0 done, 2 bad input (one line ``error: ...``);
``--verbose`` shows INFO logs.
"""

from __future__ import annotations

import sys

from absl import flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads
from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_string("workdir", None, "Training workdir or reference HF model folder.", required=True, **d)
  flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).", **d)
  flags.DEFINE_string("prompts_file", None, "A text file, one prompt per line.", **d)
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", **d)
  flags.DEFINE_enum("method", "batch", ["batch", "rejection", "two_stage"], "CALM chunk sampler.", **d)
  flags.DEFINE_integer("num_candidates", 200, "Candidates N of the batch approximation.", **d)
  flags.DEFINE_integer("max_attempts", 10_000, "Cap of the exact samplers (reported).", **d)
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt at most.", **d)
  flags.DEFINE_enum("prompt_padding", "left", ["left", "end"],
                    "CALM prompts not a multiple of K: PAD in the first chunk, or at the end (reference).",
                    **d)
  flags.DEFINE_enum("long_prompts", "refuse", ["refuse", "truncate"], "A prompt that does not fit the "
                    "context with --max_new_tokens: refuse it, or keep its last tokens (one-line warning).",
                    **d)
  flags.DEFINE_integer("batch_size", 32, "Prompts per batch.", **d)
  flags.DEFINE_integer("steps_per_call", 16, "Decoding steps per device call (progress).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", **d)
  flags.DEFINE_integer("seed", 0, "PRNG seed.", **d)


def _prompts(fv) -> list[str]:
  prompts = list(fv.prompt or [])
  if fv.prompts_file:
    try:
      with open(fv.prompts_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      why = getattr(e, "strerror", None) or e
      raise cli.UsageError(f"--prompts_file: {fv.prompts_file}: {why}") from None
    if not prompts:
      raise cli.UsageError(f"--prompts_file: {fv.prompts_file} holds no prompt (no non-blank line)")
  if not prompts:
    raise cli.UsageError("--prompt: give --prompt and/or --prompts_file")
  if any(not p.strip() for p in prompts):
    raise cli.UsageError("--prompt: a prompt is empty")
  return prompts


def _check_flags(fv) -> None:
  for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("num_candidates", 1), ("max_attempts", 1),
                    ("steps_per_call", 0), ("step", 0)):
    value = fv[name].value
    if value is not None and value < low:
      raise cli.UsageError(f"--{name}: must be >= {low}, got {value}")
  cli.check_dir_arg("workdir", fv.workdir)


def _validate(settings, kind: str) -> None:
  try:
    settings.validate(kind)
  except ValueError as e:
    raise cli.UsageError(f"--temperature/--method: {e}") from None


def fit_context(kind: str, cfg, prompts_ids: list, max_new_tokens: int, long_prompts: str) -> list:
  """The prompts' token ids, checked (or cut from the left) so that prompt + new tokens fit the context.

  The context is ``max_position_embeddings`` positions: tokens for the baseline,
  chunks of K tokens for CALM (a prompt takes whole chunks).  Raises UsageError
  (refuse) or prints one warning line per cut prompt (truncate).
  """
  k = cfg.patch_size if kind == "energy" else 1
  context = cfg.backbone.max_position_embeddings * k
  new = -(-max_new_tokens // k) * k
  if new + k > context:
    raise cli.UsageError(f"--max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {context} tokens (model.backbone.max_position_embeddings)")
  keep = (context - new) // k * k
  out = []
  for i, ids in enumerate(prompts_ids):
    if -(-len(ids) // k) * k <= keep:
      out.append(ids)
      continue
    if long_prompts == "refuse":
      raise cli.UsageError(f"--prompt: prompt {i + 1} has {len(ids)} tokens; with "
                           f"--max_new_tokens={max_new_tokens} the model's context of {context} tokens "
                           f"holds at most {keep}: shorten it, or pass --long_prompts=truncate to keep its "
                           "last tokens")
    print(f"warning: prompt {i + 1}: cut from the left to its last {keep} of {len(ids)} tokens (context "
          f"{context} tokens, --max_new_tokens={max_new_tokens})", file=sys.stderr, flush=True)
    out.append(ids[len(ids) - keep:])
  return out


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.generate``; exit status 0, or 2 with one line naming the bad input."""
  fv = cli.parse(_define, argv, __doc__, "launch.generate")
  with cli.errors():
    _check_flags(fv)
    prompts = _prompts(fv)
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.generation import generate  # pylint: disable=import-outside-toplevel

  with cli.errors(loading.LoadError, ValueError):
    kind = loading.saved_kind(fv.workdir)
    if kind == "autoencoder":
      raise cli.UsageError(f"--workdir: {fv.workdir} holds an autoencoder, which does not generate text; "
                           "give a CALM ('energy') or Transformer workdir")
    settings = generate.GenerationSettings(fv.max_new_tokens, fv.temperature, fv.method, fv.num_candidates,
                                           fv.max_attempts, fv.prompt_padding, fv.steps_per_call)
    if kind is not None:
      _validate(settings, kind)   # before the parameters are read
    trained = loading.load_trained(fv.workdir, fv.step)
    if trained.kind not in ("energy", "transformer"):
      raise cli.UsageError(f"--workdir: {fv.workdir} holds a {trained.kind!r} model, which does not generate "
                           "text")
    _validate(settings, trained.kind)
    if trained.tokenizer is None:
      raise cli.UsageError(f"--workdir: {fv.workdir} has no tokenizer.json to encode the prompts with")
    eos_id, pad_id = loading.special_ids(trained)
    ids = fit_context(trained.kind, trained.cfg, trained.tokenizer.encode_batch(prompts), fv.max_new_tokens,
                      fv.long_prompts)
  key = jax.random.key(fv.seed)
  total_tokens, total_seconds = 0, 0.0
  for start in range(0, len(prompts), fv.batch_size):
    batch = prompts[start:start + fv.batch_size]
    with tqdm(total=len(batch) * fv.max_new_tokens, desc=f"prompts {start + 1}-{start + len(batch)}",
              unit="tok", dynamic_ncols=True, file=sys.stderr) as bar:
      def progress(done, total, bar=bar):
        bar.total = total
        bar.n = min(done, total)
        bar.refresh()
      gen = generate.generate(trained.kind, trained.cfg, trained.params, ids[start:start + fv.batch_size],
                              jax.random.fold_in(key, start), settings, eos_id=eos_id, pad_id=pad_id,
                              ae_cfg=trained.ae_cfg, ae_params=trained.ae_params, progress=progress)
    texts = [trained.tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]
    total_tokens += gen.num_tokens
    total_seconds += gen.seconds
    for i, (prompt, text) in enumerate(zip(batch, texts)):
      capped = f"  [{gen.capped[i]} capped draws]" if gen.capped[i] else ""
      print(f"=== {start + i + 1}: {prompt}\n{prompt}{text}{capped}\n")
    print(f"[{gen.num_tokens} tokens in {gen.seconds:.2f}s = {gen.tokens_per_sec:,.1f} tokens/s; "
          f"compile {gen.compile_seconds:.1f}s]", file=sys.stderr)
  if len(prompts) > fv.batch_size:
    print(f"[total {total_tokens} tokens, {total_tokens / max(total_seconds, 1e-9):,.1f} tokens/s]",
          file=sys.stderr)


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  main()
