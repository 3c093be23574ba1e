"""Generate continuations of text prompts with a trained CALM or baseline model.

  python -m launch.generate --workdir=/runs/calm_m --prompt='The meaning of life is' \\
      --temperature=0.5 --method=batch --num_candidates=200 --max_new_tokens=128

  python -m launch.generate --workdir=/runs/ar_m --prompts_file=prompts.txt --temperature=0.7

--workdir is a training workdir or a reference Hugging Face folder.  CALM's
--method: 'batch' (the paper's approximation, T = 1/n, --num_candidates draws),
'rejection' (exact, T = 1/n) or 'two_stage' (exact, any T in (0, 1]); the
baseline samples softmax(logits / T) for any T > 0.  Prompts run in batches of
--batch_size (ragged lengths are fine); one line of the prompts file is one prompt.
"""

from __future__ import annotations

import sys

from absl import app, flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or reference HF model folder.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A text file, one prompt per line.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_METHOD = flags.DEFINE_enum("method", "batch", ["batch", "rejection", "two_stage"], "CALM chunk sampler.")
_NUM_CANDIDATES = flags.DEFINE_integer("num_candidates", 200, "Candidates N of the batch approximation.")
_MAX_ATTEMPTS = flags.DEFINE_integer("max_attempts", 10_000, "Cap of the exact samplers (reported).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Tokens generated per prompt at most.")
_PADDING = flags.DEFINE_enum("prompt_padding", "left", ["left", "end"],
                             "CALM prompts not a multiple of K: PAD in the first chunk, or at the end (reference).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Prompts per batch.")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", 16, "Decoding steps per device call (progress).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value or [])
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise ValueError(f"{_PROMPTS_FILE.value}: {e.strerror}") from None
  if not prompts:
    raise ValueError("give --prompt and/or --prompts_file")
  return prompts


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.generation import generate  # pylint: disable=import-outside-toplevel

  try:
    prompts = _prompts()
    trained = loading.load_trained(_WORKDIR.value, _STEP.value)
    settings = generate.GenerationSettings(_MAX_NEW_TOKENS.value, _TEMPERATURE.value, _METHOD.value,
                                           _NUM_CANDIDATES.value, _MAX_ATTEMPTS.value, _PADDING.value,
                                           _STEPS_PER_CALL.value)
    settings.validate(trained.kind)
  except (loading.LoadError, ValueError) as e:
    sys.exit(f"error: {e}")
  key = jax.random.key(_SEED.value)
  total_tokens, total_seconds = 0, 0.0
  for start in range(0, len(prompts), _BATCH_SIZE.value):
    batch = prompts[start:start + _BATCH_SIZE.value]
    with tqdm(total=len(batch) * _MAX_NEW_TOKENS.value, desc=f"prompts {start + 1}-{start + len(batch)}",
              unit="tok", dynamic_ncols=True, file=sys.stderr) as bar:
      def progress(done, total, bar=bar):
        bar.total = total
        bar.n = min(done, total)
        bar.refresh()
      texts, gen = generate.generate_text(trained, batch, jax.random.fold_in(key, start), settings, progress)
    total_tokens += gen.num_tokens
    total_seconds += gen.seconds
    for i, (prompt, text) in enumerate(zip(batch, texts)):
      capped = f"  [{gen.capped[i]} capped draws]" if gen.capped[i] else ""
      print(f"=== {start + i + 1}: {prompt}\n{prompt}{text}{capped}\n")
    print(f"[{gen.num_tokens} tokens in {gen.seconds:.2f}s = {gen.tokens_per_sec:,.1f} tokens/s; "
          f"compile {gen.compile_seconds:.1f}s]", file=sys.stderr)
  if len(prompts) > _BATCH_SIZE.value:
    print(f"[total {total_tokens} tokens, {total_tokens / max(total_seconds, 1e-9):,.1f} tokens/s]",
          file=sys.stderr)


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  app.run(main)
