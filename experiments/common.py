"""Pieces shared by the experiment families: the config skeleton and the arg parser.

Every experiment is an ``ml_collections.ConfigDict`` with the fields below (the
shared contract read by :func:`calm_jax.training.train.resolve`)::

  kind          'autoencoder' | 'energy' | 'transformer'
  model         the model dataclass as a dict (``AutoencoderConfig`` /
                ``EnergyConfig`` / ``TransformerConfig`` ``.to_dict()``)
  ae_workdir    energy only: the stage-1 autoencoder's workdir (read-only)
  data          prepared-data directory, tokenizer, the corpus to prepare it from
  optim         ``calm_jax.training.optim.OptimConfig`` fields
  train         steps, batch, seed and the cadence of logs, evals and checkpoints
  mesh          data / fsdp / tensor device counts (-1: all remaining devices)
  sharding_rules  the logical-axis rules table, every entry overridable: name -> 'axis', 'a,b' or ''
  eval          held-out evaluation settings

Fields that may legitimately be unset are ``placeholder``s, so that a
command-line override still has a type to parse against.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from calm_jax.parallel import sharding
from calm_jax.training.optim import OptimConfig

# Llama-3's 128,256 tokens plus the [PAD] the reference adds (CALM_NOTES §1.1).
PAPER_VOCAB = 128257
# The tiny variants use a byte-level BPE trained on the embedded corpus.
TINY_VOCAB = 1024


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """``'size=M,K=4'`` / ``'tiny'`` / ``'tiny,K=2'`` -> dict over ``defaults``' keys.

  A bare word sets a boolean flag (``tiny``); values are converted to the type of
  the default.  An unknown key is an error naming it, like any other config typo.
  """
  out = dict(defaults)
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, sep, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg {key!r}: unknown (known: {', '.join(sorted(defaults))})")
    if not sep:
      out[key] = True
      continue
    kind, value = type(defaults[key]), value.strip()
    if kind is bool:
      if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"config arg {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        expected = "an integer" if kind is int else kind.__name__
        raise ValueError(f"config arg {key}={value!r}: expected {expected}") from None
  return out


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """OptimConfig's fields with the reference's defaults; None fields become typed placeholders."""
  fields = dataclasses.asdict(OptimConfig(**overrides))
  types = {"total_steps": int, "grad_clip_norm": float, "mu_dtype": str}
  return ml_collections.ConfigDict({k: config_dict.placeholder(types[k]) if v is None and k in types else v
                                    for k, v in fields.items()})


def skeleton(kind: str, model: dict, *, block_length: int, mode: str, steps: int, global_batch_size: int,
             vocab_size: int) -> ml_collections.ConfigDict:
  """The full config with the defaults every family shares; families then edit it."""
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.model = ml_collections.ConfigDict(model)
  c.ae_workdir = ""

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""                      # a directory written by `python -m launch.prepare`
  c.data.tokenizer = ""                # tokenizer.json (dir); '' = the one saved in data.dir
  c.data.source = "default:train"      # what auto_prepare tokenises (see calm_jax/data/sources.py)
  c.data.valid_source = "default:valid"
  c.data.block_length = block_length
  c.data.mode = mode                   # 'ae': EOS + PAD to K per document; 'lm': concatenation
  c.data.vocab_size = vocab_size       # size of the BPE trained when no tokenizer is given
  c.data.valid_fraction = 0.0          # held out by hash when there is no valid_source
  c.data.auto_prepare = False          # prepare data.dir from data.source when it is missing

  c.optim = optim_config()

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.global_batch_size = global_batch_size
  c.train.seed = 0
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_batches = 16            # held-out batches per evaluation (0: the whole split)
  c.train.eval_batch_size = global_batch_size

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  # The whole table (calm_jax.parallel.sharding.DEFAULT_RULES as strings), so that any entry can be
  # overridden from the command line, e.g. --config.sharding_rules.mlp=fsdp,tensor.
  c.sharding_rules = ml_collections.ConfigDict(sharding.rules_config())

  c.eval = ml_collections.ConfigDict()
  c.eval.ae_noise_sigma = 0.3          # sigma of the Gaussian added to the latent (CALM_NOTES §1.4)
  c.eval.brier = False                 # BrierLM during training (needs calm_jax.evaluation.evaluate)
  c.eval.block_length = 256            # BrierLM: prefix + continuation tokens
  c.eval.num_blocks = 64
  c.eval.temperature = 1.0
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, *, steps: int, global_batch_size: int) -> None:
  """The cadence of a run that finishes in minutes on a laptop CPU."""
  c.data.auto_prepare = True
  c.train.steps = steps
  c.train.global_batch_size = global_batch_size
  c.train.eval_batch_size = global_batch_size
  c.train.log_every = 10
  c.train.eval_every = max(steps // 2, 1)
  c.train.checkpoint_every = max(steps // 4, 1)
  c.train.eval_batches = 8
