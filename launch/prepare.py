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
manifest in ``calm_jax/data/blocks.py``.  A corpus that gives no training block,
an existing prepared directory (without --overwrite) and a --out_dir that is a
file or holds anything else are refused.  Exit status: 0 done, 2 bad input (one
line ``error: ...``); ``--verbose`` shows INFO logs.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_multi_string("source", None, "Source spec(s), read in order.", required=True, **d)
  flags.DEFINE_multi_string("valid_source", None, "Explicit validation source(s); overrides "
                            "--valid_fraction.", **d)
  flags.DEFINE_string("out_dir", None, "Output directory.", required=True, **d)
  flags.DEFINE_string("tokenizer", None, "tokenizer.json or its directory; default: a BPE trained on the "
                      "embedded corpus (--vocab_size).", **d)
  flags.DEFINE_integer("vocab_size", 8192, "Vocabulary of the default BPE tokenizer.", **d)
  flags.DEFINE_string("eos_token", None, "EOS token when the tokenizer's side files lack it.", **d)
  flags.DEFINE_enum("mode", None, ["ae", "lm"], "Packing: ae (EOS + PAD to K per document) or lm "
                    "(concatenation).", required=True, **d)
  flags.DEFINE_integer("block_length", None, "Tokens per block; a multiple of --patch_size.", required=True,
                       **d)
  flags.DEFINE_integer("patch_size", 4, "Autoencoder chunk size K.", **d)
  flags.DEFINE_float("valid_fraction", 0.0, "Documents held out by hash.", **d)
  flags.DEFINE_bool("append_eos", True, "lm mode: append EOS to every document (False = the reference's "
                    "plain concatenation).", **d)
  flags.DEFINE_integer("blocks_per_shard", 16384, "Blocks per ArrayRecord file.", **d)
  flags.DEFINE_integer("max_documents", None, "Stop after this many training documents.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace an existing prepared directory.", **d)


def _check_flags(fv: flags.FlagValues) -> None:
  """The checks that need no file read, so that a typo does not wait for a tokenizer."""
  from calm_jax.data import blocks as blocks_lib  # pylint: disable=import-outside-toplevel
  from calm_jax.data import packing  # pylint: disable=import-outside-toplevel
  if fv.block_length < 1:
    raise cli.UsageError(f"--block_length: must be >= 1, got {fv.block_length}")
  if fv.patch_size < 1:
    raise cli.UsageError(f"--patch_size: must be >= 1, got {fv.patch_size}")
  try:
    packing.check_block_shape(fv.block_length, fv.patch_size)
  except ValueError as e:
    raise cli.UsageError(f"--block_length: {e}") from None
  if not 0.0 <= fv.valid_fraction < 1.0:
    raise cli.UsageError(f"--valid_fraction: must lie in [0, 1), got {fv.valid_fraction}")
  if fv.blocks_per_shard < 1:
    raise cli.UsageError(f"--blocks_per_shard: must be >= 1, got {fv.blocks_per_shard}")
  if fv.max_documents is not None and fv.max_documents < 1:
    raise cli.UsageError(f"--max_documents: must be >= 1, got {fv.max_documents}")
  if not fv.tokenizer and fv.vocab_size <= 258:
    raise cli.UsageError(f"--vocab_size: {fv.vocab_size} is too small for a byte-level BPE (> 258: 256 "
                         "bytes, EOS and PAD)")
  out = os.path.expanduser(fv.out_dir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise cli.UsageError(f"--out_dir: {out} is a file, not a directory")
  if os.path.isdir(out) and not os.path.isfile(os.path.join(out, blocks_lib.MANIFEST)):
    entries = sorted(os.listdir(out))
    if entries:
      raise cli.UsageError(f"--out_dir: {out} is not empty ({', '.join(entries[:3])}"
                           f"{', ...' if len(entries) > 3 else ''}) and is not a prepared data set; choose a "
                           "new or empty directory")
  if os.path.isfile(os.path.join(out, blocks_lib.MANIFEST)) and not fv.overwrite:
    raise cli.UsageError(f"--out_dir: {out} already holds a prepared data set (pass --overwrite to replace "
                         "it)")


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.prepare``; exit status 0, or 2 with one line naming the bad input."""
  fv = cli.parse(_define, argv, __doc__, "launch.prepare")
  from calm_jax import data  # pylint: disable=import-outside-toplevel
  from calm_jax.data import blocks as blocks_lib  # pylint: disable=import-outside-toplevel

  with cli.errors(data.DataError):
    _check_flags(fv)
    source = data.open_source(fv.source)
    valid_source = data.open_source(fv.valid_source) if fv.valid_source else None
    if fv.tokenizer:
      tok = data.load_tokenizer(fv.tokenizer, eos_token=fv.eos_token)
    else:
      tok = data.load_tokenizer(None, vocab_size=fv.vocab_size)
    print(tok)
    manifest = data.prepare(
        source, fv.out_dir, tok, fv.block_length, fv.patch_size, fv.mode, fv.valid_fraction,
        valid_source_spec=valid_source, append_eos=fv.append_eos, blocks_per_shard=fv.blocks_per_shard,
        max_documents=fv.max_documents, overwrite=fv.overwrite)
  print(blocks_lib.describe(manifest))
  print(f"wrote {fv.out_dir}")


def run() -> None:
  main()


if __name__ == "__main__":
  main(sys.argv)
