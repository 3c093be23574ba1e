"""The discrete baseline: a Llama decoder with an untied LM head (CALM_NOTES §3).

  size  layers  width  FFN   params
  S     12      768    2048  281.96M
  M     16      1024   2752  465.08M
  L     16      1536   4096  847.04M (the paper says 849M; see CALM_NOTES §3)

Recipe: 2048-token blocks, 1024 of them per step (2M tokens), 250k steps,
AdamW 3e-4 constant, the same tokenizer and data as CALM.

  python -m launch.train --config=experiments/transformer.py:size=S --workdir=/runs/tf_s \\
      --config.data.dir=/data/pile_lm_2048 --config.data.tokenizer=/ckpt/llama3_tokenizer

  # Tiny, on a CPU:
  python -m launch.train --config=experiments/transformer.py:tiny --workdir=/tmp/tf_tiny

Args: ``size=<S|M|L>``, ``tiny``.
"""

from __future__ import annotations

import os

from calm_jax.configs import LlamaConfig, TransformerConfig
from experiments import common

SIZES = {  # layers, width, FFN
    "S": (12, 768, 2048),
    "M": (16, 1024, 2752),
    "L": (16, 1536, 4096),
}
BLOCK_TOKENS = 2048


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, {"size": "S", "tiny": False})
  if a["size"] not in SIZES:
    raise ValueError(f"config arg size={a['size']}: Transformer sizes are {sorted(SIZES)}")
  layers, d, ff = SIZES[a["size"]]
  backbone = LlamaConfig(vocab_size=common.PAPER_VOCAB, hidden_size=d, intermediate_size=ff,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=BLOCK_TOKENS, dtype="bfloat16", scan_layers=True,
                         remat_policy="dots")
  model = TransformerConfig(backbone=backbone)
  # 2M tokens per step: 1024 blocks of 2048 tokens.
  c = common.skeleton("transformer", model.to_dict(), block_length=BLOCK_TOKENS, mode="lm", steps=250_000,
                      global_batch_size=1024, vocab_size=common.PAPER_VOCAB)
  c.optim.learning_rate = 3e-4
  c.eval.block_length = BLOCK_TOKENS   # the reference evaluates BrierLM on blocks this long
  if a["tiny"]:
    _tiny(c)
  return c


def _tiny(c) -> None:
  """Two layers of width 128 on 256-token blocks: the same data as tiny CALM (K=4)."""
  from calm_jax.data import corpus  # pylint: disable=import-outside-toplevel

  v = common.TINY_VOCAB
  c.model.backbone.update(vocab_size=v, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          dtype="float32", scan_layers=False, remat_policy="none")
  c.data.vocab_size = v
  c.data.block_length = 256
  # Shares the prepared directory of tiny CALM with K=4 (same mode, blocks and tokenizer).
  c.data.dir = os.path.join(corpus.cache_dir(), "prepared", f"default-lm-T256-K4-V{v}")
  # As tiny CALM: 150 steps, one evaluation at the end.
  common.shrink_for_cpu(c, steps=150, global_batch_size=8)
  c.train.eval_every = c.train.steps
  c.optim.learning_rate = 1e-3
  c.eval.block_length = 256
  # BrierLM ('lowvar') on 16 held-out blocks: its rollouts from all 252 positions of a block
  # cost more than the teacher-forced CALM estimate.
  c.eval.brier = True
  c.eval.num_blocks = 16
