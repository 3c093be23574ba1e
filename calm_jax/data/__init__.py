"""Data for calm_jax: sources -> tokenizer -> packed ArrayRecord blocks -> grain batches.

Tokenise once, then train from the prepared directory on any number of hosts::

  from calm_jax import data

  tok = data.load_tokenizer("/ckpt/llama3_tokenizer")   # adds [PAD]: vocab 128257
  manifest = data.prepare("jsonl:/pile/0[01].text.jsonl", "/data/ae_k4", tok,
                          block_length=2048, patch_size=4, mode="ae",
                          valid_fraction=0.001)
  it = data.make_train_iterator("/data/ae_k4", "train", global_batch_size=256, seed=0,
                                expect=dict(block_length=2048, patch_size=4,
                                            tokenizer_fingerprint=tok.fingerprint))
  batch = next(it)              # {'tokens': int32 [256 // process_count, 2048]}
  state = it.get_state()        # JSON-able; it.set_state(state) resumes exactly

Without any download (smoke runs, tests)::

  tok = data.load_tokenizer(None, vocab_size=8192)      # BPE on the default corpus
  data.prepare("default:train", out, tok, 512, 4, "lm",
               valid_source_spec="default:valid")

Modules: ``sources`` (text, JSON lines, TFDS, token shards), ``tokenizer``,
``packing`` (ae/lm block packing, split rule), ``blocks`` (prepare: shards + manifest),
``pipeline`` (grain iterators), ``corpus`` (the embedded stdlib corpus).
The command line is ``python -m launch.prepare``.
"""

import importlib

from calm_jax.data.blocks import check_manifest, load_manifest, prepare
from calm_jax.data.corpus import default_corpus, default_corpus_files
from calm_jax.data.errors import DataError
from calm_jax.data.packing import BlockPacker, is_valid_document
from calm_jax.data.sources import SourceSpec, open_source, parse_spec
from calm_jax.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "BlockPacker",
    "DataError",
    "SourceSpec",
    "TextTokenizer",
    "check_manifest",
    "default_corpus",
    "default_corpus_files",
    "is_valid_document",
    "load_manifest",
    "load_tokenizer",
    "make_eval_iterator",
    "make_train_iterator",
    "num_eval_batches",
    "open_source",
    "parse_spec",
    "prepare",
    "train_bpe_tokenizer",
]

# The iterators are imported on first use: grain imports jax (seconds of start-up),
# which preparing data does not need.
_LAZY = {"make_train_iterator": "pipeline", "make_eval_iterator": "pipeline", "num_eval_batches": "pipeline"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"calm_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'calm_jax.data' has no attribute {name!r}")
