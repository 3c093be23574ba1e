"""Tokenises a corpus once into ArrayRecord blocks for training (run on one machine).

  # Autoencoder data as the reference: Pile shards 00-01, Llama-3 tokenizer, K=4.
  python -m launch.prepare --source='jsonl:/pile/0[01].jsonl;max_words=10000' \\
      --tokenizer=/ckpt/llama3_tokenizer --out_dir=/data/pile_ae_k4 \\
      --mode=ae --block_length=2048 --patch_size=4 --valid_fraction=0.0005

  # CALM data: shards 02-29, 8192-token blocks, evaluated on WikiText-103 documents.
  python -m launch.prepare --source='jsonl:/pile/[0-2][0-9].jsonl;max_words=10000' \\
      --valid_source=/calm/data/wikitext_document_level-test.json \\
      --tokenizer=/ckpt/llama3_tokenizer --out_dir=/data/pile_lm_8192 \\
      --mode=lm --block_length=8192 --patch_size=4

  # Offline smoke data from the embedded corpus and a BPE trained on it.
  python -m launch.prepare --source=default:train --valid_source=default:valid \\
      --vocab_size=8192 --out_dir=/tmp/smoke_lm --mode=lm --block_length=512 --patch_size=4

Source specs are described in ``calm_jax/data/sources.py``; the output layout and
manifest in ``calm_jax/data/blocks.py``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from calm_jax import data
from calm_jax.data import blocks as blocks_lib
from calm_jax.data import packing

_SOURCE = flags.DEFINE_multi_string("source", None, "Source spec(s), read in order.", required=True)
_VALID_SOURCE = flags.DEFINE_multi_string("valid_source", None,
                                          "Explicit validation source(s); overrides --valid_fraction.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or its directory; default: a BPE "
                                 "trained on the embedded corpus (--vocab_size).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary of the default BPE tokenizer.")
_EOS_TOKEN = flags.DEFINE_string("eos_token", None, "EOS token when the tokenizer's side files lack it.")
_MODE = flags.DEFINE_enum("mode", None, ["ae", "lm"], "Packing: ae (EOS + PAD to K per document) or lm "
                          "(concatenation).", required=True)
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", None, "Tokens per block; a multiple of --patch_size.",
                                     required=True)
_PATCH_SIZE = flags.DEFINE_integer("patch_size", 4, "Autoencoder chunk size K.")
_VALID_FRACTION = flags.DEFINE_float("valid_fraction", 0.0, "Documents held out by hash.")
_APPEND_EOS = flags.DEFINE_bool("append_eos", True, "lm mode: append EOS to every document (False = the "
                                "reference's plain concatenation).")
_BLOCKS_PER_SHARD = flags.DEFINE_integer("blocks_per_shard", 16384, "Blocks per ArrayRecord file.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", None, "Stop after this many training documents.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing prepared directory.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    # Cheap checks first: a typo should not wait for a tokenizer to train.
    packing.check_block_shape(_BLOCK_LENGTH.value, _PATCH_SIZE.value)
    source = data.open_source(_SOURCE.value)
    valid_source = data.open_source(_VALID_SOURCE.value) if _VALID_SOURCE.value else None
    if _TOKENIZER.value:
      tok = data.load_tokenizer(_TOKENIZER.value, eos_token=_EOS_TOKEN.value)
    else:
      tok = data.load_tokenizer(None, vocab_size=_VOCAB_SIZE.value)
    print(tok)
    manifest = data.prepare(
        source, _OUT_DIR.value, tok, _BLOCK_LENGTH.value, _PATCH_SIZE.value, _MODE.value,
        _VALID_FRACTION.value, valid_source_spec=valid_source, append_eos=_APPEND_EOS.value,
        blocks_per_shard=_BLOCKS_PER_SHARD.value, max_documents=_MAX_DOCUMENTS.value,
        overwrite=_OVERWRITE.value)
  except data.DataError as e:
    # One line, no traceback: these are input problems for the user to fix.
    sys.exit(f"error: {e}")
  print(blocks_lib.describe(manifest))
  print(f"wrote {_OUT_DIR.value}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
