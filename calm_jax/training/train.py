"""One training loop for the autoencoder, CALM and the discrete baseline.

``run(config, workdir)`` does, in order (STYLE §2-§5, §9, §11, §12):

  1. ``resolve``: the ConfigDict -> typed, validated settings; every error names
     its field (``model.num_attention_heads``, ``data.block_length``,
     ``model.latent_size`` against the autoencoder checkpoint, ...) and nothing
     has started;
  2. the mesh (``config.mesh``) and the logical-axis rules;
  3. the data: ``data.dir`` prepared by ``launch.prepare`` (or here, from
     ``data.source``, when ``data.auto_prepare``), its manifest checked against
     the config (block length, K, vocabulary, tokenizer fingerprint);
  4. the state: resume this workdir's latest readable checkpoint (with the data
     iterator's position), or initialise; for CALM the autoencoder's parameters
     are read once from ``ae_workdir`` and passed to every step, frozen;
  5. the loop: one jitted step with the state donated; metrics fetched one step
     late, except on the steps that save or evaluate, where the step's own
     metrics (and, before a save, the state) are checked first: a NaN/Inf stops
     the run (:class:`metrics.NonFiniteError`) naming the step and the last
     finite checkpoint, and nothing non-finite is ever saved; evaluation every
     ``train.eval_every`` steps and at the end; checkpoints every
     ``train.checkpoint_every`` steps, on SIGTERM (then :class:`Preempted` is
     raised) and at the end.

Steps are numbered from 1 everywhere a user sees them: step ``n`` is the state
after ``n`` updates, saved as checkpoint ``n``, logged as ``"step": n``.

Workdir layout: ``config.json``, ``tokenizer/``, ``checkpoints/``,
``metrics.jsonl``, ``tb/``.  Starting again in the same workdir resumes (the
rows of ``metrics.jsonl`` past the restored step are dropped first, so every
step is logged once); a run whose last checkpoint is at ``train.steps`` only
evaluates.  A workdir that holds another kind of run, another model, or
anything but a calm_jax run is refused before anything is written
(:func:`check_workdir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from calm_jax import data as data_lib
from calm_jax import models
from calm_jax.configs import AutoencoderConfig, ConfigError, EnergyConfig, TransformerConfig
from calm_jax.parallel import sharding
from calm_jax.training import checkpoint, metrics, trainers
from calm_jax.training.optim import OptimConfig

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "Experiment", "Preempted", "check_workdir", "follow_data_vocab", "resolve", "run"]


class Preempted(Exception):
  """SIGTERM arrived: the state of ``step`` was saved in ``directory``; running again resumes there."""

  def __init__(self, step: int, directory: str):
    self.step, self.directory = int(step), str(directory)
    super().__init__(f"preempted (SIGTERM) at step {step}: saved {directory}/{step}")


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[calm_jax] {msg}", flush=True)


# --------------------------------------------------------------------------- the config, typed


@dataclasses.dataclass(frozen=True)
class DataSettings:
  dir: str = ""
  tokenizer: str = ""
  source: str = "default:train"
  valid_source: str = "default:valid"
  block_length: int = 2048
  mode: str = "lm"
  vocab_size: int = 8192
  valid_fraction: float = 0.0
  auto_prepare: bool = False


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  steps: int = 1000
  global_batch_size: int = 8
  seed: int = 0
  log_every: int = 50
  eval_every: int = 1000
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  eval_batches: int = 16
  eval_batch_size: int = 0    # 0: global_batch_size
  peak_flops_per_device: float = 0.0   # for perf/mfu; 0: known table (TPU/GPU), else measured


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  ae_noise_sigma: float = 0.3
  brier: bool = False
  block_length: int = 256
  num_blocks: int = 64
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated experiment: what ``run`` and the registry tests consume.

  ``ae_model`` is the autoencoder CALM runs on: read from ``ae_workdir``'s
  config.json, or (``resolve(..., check_paths=False)``) the paper's autoencoder
  for the model's K and latent size.
  """
  kind: str
  model: Any
  optim: OptimConfig
  data: DataSettings
  train: TrainSettings
  eval: EvalSettings
  mesh: dict
  sharding_rules: dict
  ae_workdir: str
  ae_model: AutoencoderConfig | None
  config_dict: dict

  @property
  def vocab_size(self) -> int:
    return self.model.vocab_size if self.kind == "autoencoder" else self.model.backbone.vocab_size


_MODEL_TYPES = {"autoencoder": AutoencoderConfig, "energy": EnergyConfig, "transformer": TransformerConfig}
_TOP_LEVEL = ("kind", "model", "ae_workdir", "data", "optim", "train", "mesh", "sharding_rules", "eval")


def _section(cls, d: Mapping, name: str):
  """A settings dataclass from a dict; unknown keys and wrong types are errors naming ``name.key``."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for k, v in dict(d).items():
    if k not in fields:
      raise ConfigError(f"{name}.{k}: unknown key (known: {', '.join(fields)})")
    default = fields[k].default
    ok = (isinstance(v, bool) if isinstance(default, bool)
          else isinstance(v, int) and not isinstance(v, bool) if isinstance(default, int)
          else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, float)
          else isinstance(v, str))
    if not ok:
      raise ConfigError(f"{name}.{k}: expected {type(default).__name__}, got {v!r}")
    kwargs[k] = float(v) if isinstance(default, float) else v
  return cls(**kwargs)


def _positive(obj, name: str, *fields_):
  for f in fields_:
    if getattr(obj, f) < 1:
      raise ConfigError(f"{name}.{f}: must be >= 1, got {getattr(obj, f)}")


def read_ae_config(ae_workdir: str) -> AutoencoderConfig:
  """The autoencoder config saved by stage 1 in ``ae_workdir/config.json``."""
  path = os.path.join(ae_workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"ae_workdir: {path} does not exist (train the autoencoder there first)")
  with open(path) as f:
    saved = json.load(f)
  if saved.get("kind") != "autoencoder":
    raise ConfigError(f"ae_workdir: {ae_workdir} holds a {saved.get('kind')!r} run, not an autoencoder")
  return AutoencoderConfig.from_dict(saved["model"], f"{path}:model")


def resolve(config: Any, *, check_paths: bool = True) -> Experiment:
  """Validate a config (ConfigDict or dict) into an :class:`Experiment`; nothing is started.

  Args:
    config: the experiment (``experiments/*.py``; fields in ``experiments/common.py``).
    check_paths: read ``ae_workdir``'s config (CALM) and compare it with the model;
      False for abstract builds (the registry's tests, parameter counts).

  Raises:
    ConfigError: the message starts with the offending field, e.g.
      ``model.backbone.num_key_value_heads: ...`` or ``data.block_length: ...``.
  """
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  unknown = sorted(set(d) - set(_TOP_LEVEL))
  if unknown:
    raise ConfigError(f"{unknown[0]}: unknown top-level key (known: {', '.join(_TOP_LEVEL)})")
  kind = d.get("kind")
  if kind not in _MODEL_TYPES:
    raise ConfigError(f"kind: must be one of {tuple(_MODEL_TYPES)}, got {kind!r}")
  model = _MODEL_TYPES[kind].from_dict(d.get("model", {}), "model")
  optim_d = dict(d.get("optim", {}))
  known = {f.name for f in dataclasses.fields(OptimConfig)}
  for k in optim_d:
    if k not in known:
      raise ConfigError(f"optim.{k}: unknown key (known: {', '.join(sorted(known))})")
  try:
    optim_cfg = OptimConfig(**optim_d)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e).replace("OptimConfig.", "optim.")) from None
  data = _section(DataSettings, d.get("data", {}), "data")
  train = _section(TrainSettings, d.get("train", {}), "train")
  if not train.eval_batch_size:
    train = dataclasses.replace(train, eval_batch_size=train.global_batch_size)
  evals = _section(EvalSettings, d.get("eval", {}), "eval")
  _positive(train, "train", "steps", "global_batch_size", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "eval_batch_size")
  if train.global_batch_size % optim_cfg.grad_accum_steps:
    raise ConfigError(f"optim.grad_accum_steps: {optim_cfg.grad_accum_steps} does not divide "
                      f"train.global_batch_size={train.global_batch_size}")
  if data.mode not in ("ae", "lm"):
    raise ConfigError(f"data.mode: must be 'ae' or 'lm', got {data.mode!r}")
  _positive(data, "data", "block_length")
  _check_eval(kind, model, data, evals)

  if kind != "transformer" and data.block_length % model.patch_size:
    raise ConfigError(f"data.block_length: {data.block_length} is not a multiple of "
                      f"model.patch_size={model.patch_size}")
  if kind == "energy":
    chunks = data.block_length // model.patch_size
    if chunks < 2:
      raise ConfigError(f"data.block_length: {data.block_length} gives {chunks} chunk(s); CALM needs >= 2")
    if chunks - 1 > model.backbone.max_position_embeddings:
      raise ConfigError(f"model.backbone.max_position_embeddings: {model.backbone.max_position_embeddings} "
                        f"< the {chunks - 1} input chunks of data.block_length={data.block_length}")
  if kind == "transformer" and data.block_length > model.backbone.max_position_embeddings:
    raise ConfigError(f"model.backbone.max_position_embeddings: {model.backbone.max_position_embeddings} "
                      f"< data.block_length={data.block_length}")
  vocab_field = "model.vocab_size" if kind == "autoencoder" else "model.backbone.vocab_size"
  vocab = model.vocab_size if kind == "autoencoder" else model.backbone.vocab_size
  prepared = bool(data.dir) and os.path.isfile(os.path.join(data.dir, data_lib.blocks.MANIFEST))
  if data.auto_prepare and not data.tokenizer and not (check_paths and prepared) and vocab != data.vocab_size:
    raise ConfigError(f"{vocab_field}: {vocab}, but the BPE tokenizer auto_prepare trains has "
                      f"data.vocab_size={data.vocab_size}")

  ae_workdir = d.get("ae_workdir", "") or ""
  ae_model = None
  if kind == "energy":
    if check_paths:
      if not ae_workdir:
        raise ConfigError("ae_workdir: CALM needs the stage-1 autoencoder's workdir")
      ae_model = read_ae_config(ae_workdir)
      for f, ours in (("patch_size", model.patch_size), ("latent_size", model.latent_size),
                      ("vocab_size", vocab)):
        if getattr(ae_model, f) != ours:
          field = vocab_field if f == "vocab_size" else f"model.{f}"
          raise ConfigError(f"{field}: {ours}, but the autoencoder in {ae_workdir} has {f}="
                            f"{getattr(ae_model, f)}")
    else:
      ae_model = AutoencoderConfig(vocab_size=vocab, patch_size=model.patch_size,
                                   latent_size=model.latent_size)
  mesh = dict(d.get("mesh") or {"data": 1, "fsdp": -1, "tensor": 1})
  for k in mesh:
    if k not in sharding.AXES:
      raise ConfigError(f"mesh.{k}: unknown mesh axis (known: {', '.join(sharding.AXES)})")
  rules = dict(d.get("sharding_rules") or {})
  try:
    sharding.rules_from_config(rules)
  except sharding.ShardingError as e:
    raise ConfigError(str(e).removeprefix("config.")) from None
  return Experiment(kind, model, optim_cfg, data, train, evals, mesh, rules, ae_workdir, ae_model, d)


def _check_eval(kind: str, model, data: DataSettings, evals: EvalSettings) -> None:
  """BrierLM during training cuts the held-out blocks into ``eval.block_length`` pieces."""
  if evals.ae_noise_sigma < 0:
    raise ConfigError(f"eval.ae_noise_sigma: must be >= 0, got {evals.ae_noise_sigma}")
  if not evals.brier:
    return
  if kind == "autoencoder":
    raise ConfigError("eval.brier: BrierLM needs an 'energy' or 'transformer' model, not the autoencoder")
  _positive(evals, "eval", "block_length", "num_blocks")
  if data.block_length % evals.block_length:
    raise ConfigError(f"eval.block_length: {evals.block_length} does not divide data.block_length="
                      f"{data.block_length} (BrierLM evaluates pieces of the held-out blocks)")
  from calm_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  try:
    evaluate_lib.check_block_length(kind, model, evals.block_length)
  except ValueError as e:
    raise ConfigError(f"eval.block_length: {e}") from None


# --------------------------------------------------------------------------- the workdir


# Model fields that change how a step is computed, not what a checkpoint holds: a restart may change them.
RESUMABLE_MODEL_FIELDS = frozenset({"dtype", "remat_policy", "attention_impl"})


def _first_difference(saved: Any, ours: Any, path: str, ignore: frozenset = frozenset()) -> str | None:
  """The first dotted key where two JSON trees differ, with both values; None when equal.

  Keys named in ``ignore`` (at any depth) are not compared.
  """
  if isinstance(saved, dict) and isinstance(ours, dict):
    for k in sorted((set(saved) | set(ours)) - ignore):
      if k not in saved or k not in ours:
        return f"{path}.{k} ({'absent' if k not in saved else repr(saved[k])} there, " \
               f"{'absent' if k not in ours else repr(ours[k])} here)"
      diff = _first_difference(saved[k], ours[k], f"{path}.{k}", ignore)
      if diff:
        return diff
    return None
  return None if saved == ours else f"{path}={saved!r} there, {ours!r} here"


def check_workdir(workdir: str, config_dict: Mapping) -> dict | None:
  """Refuse a workdir that this run could not resume without spoiling what it holds.

  Refused (:class:`ConfigError` naming ``workdir`` and what it holds): a file; a
  non-empty directory without ``config.json`` (not a calm_jax run: a prepared
  data set, a model folder, ...); a run of another ``kind``; a run of another
  ``model`` (any model field but :data:`RESUMABLE_MODEL_FIELDS`: the compute
  dtype, remat policy and attention implementation).  Other fields (learning
  rate, steps, cadences, data) may change between restarts.  Nothing is written.

  Returns the workdir's saved config, or None for a new or empty directory.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"workdir: {workdir} is a file, not a directory")
  if not os.path.isdir(workdir):
    return None
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    entries = sorted(e for e in os.listdir(workdir) if not e.startswith("."))
    if entries:
      shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
      raise ConfigError(f"workdir: {workdir} is not empty ({shown}) and holds no config.json: not a "
                        "calm_jax run; choose a new or empty directory")
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"workdir: {path} is unreadable ({e}); choose another workdir") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"workdir: {path} is not a calm_jax config (a JSON object)")
  kind = config_dict.get("kind")
  if saved.get("kind") != kind:
    held = saved.get("kind")
    a = lambda word: "an" if str(word)[:1] in "aeiou" else "a"
    raise ConfigError(f"workdir: {workdir} holds {a(held)} {held!r} run, not {a(kind)} {kind!r} one; choose "
                      "another workdir (nothing was written)")
  ours = json.loads(json.dumps(dict(config_dict).get("model", {}), default=str))
  diff = _first_difference(saved.get("model", {}), ours, "model", RESUMABLE_MODEL_FIELDS)
  if diff:
    raise ConfigError(f"workdir: {workdir} holds a run of another model: {diff}; choose another "
                      "workdir (nothing was written)")
  return saved


def follow_data_vocab(config, overridden: Sequence[str] = ()) -> str | None:
  """Set the model's vocabulary from the data's tokenizer unless ``overridden`` names it; in place.

  ``overridden``: the config fields set explicitly (e.g. from ``--config.*``
  flags, as ``model.backbone.vocab_size``).  The size is read from ``data.dir``'s
  manifest when prepared, else from ``data.tokenizer``, else it is
  ``data.vocab_size`` (the BPE that auto-prepare trains).  Conversely an explicit
  model vocabulary sets ``data.vocab_size`` for that BPE unless that is set too.
  Returns a note of what changed, or None.  A mismatch that remains (both set)
  is reported by :func:`resolve` / the data check, naming both values.
  """
  kind = config.get("kind")
  if kind not in _MODEL_TYPES or "model" not in config or "data" not in config:
    return None
  field = "model.vocab_size" if kind == "autoencoder" else "model.backbone.vocab_size"
  holder = config.model if kind == "autoencoder" else config.model.get("backbone")
  if holder is None or "vocab_size" not in holder:
    return None
  data = config.data
  if field in overridden:
    if "data.vocab_size" not in overridden and "vocab_size" in data and data.vocab_size != holder.vocab_size:
      data.vocab_size = holder.vocab_size
    return None
  manifest = os.path.join(data.get("dir") or "", data_lib.blocks.MANIFEST)
  if data.get("dir") and os.path.isfile(manifest):
    vocab, source = data_lib.load_manifest(data.dir)["vocab_size"], f"{data.dir}'s tokenizer"
  elif data.get("tokenizer"):
    try:
      vocab = data_lib.load_tokenizer(data.tokenizer).vocab_size
    except data_lib.DataError as e:
      raise data_lib.DataError(f"data.tokenizer: {e}") from None
    source = f"data.tokenizer={data.tokenizer}"
  elif "vocab_size" in data:
    vocab, source = data.vocab_size, "data.vocab_size"
  else:
    return None
  if vocab == holder.vocab_size:
    return None
  old, holder.vocab_size = holder.vocab_size, int(vocab)
  if "vocab_size" in data:
    data.vocab_size = int(vocab)
  return f"{field}: {vocab} from {source} (the config said {old})"


# --------------------------------------------------------------------------- data


def _prepare_patch_size(exp: Experiment) -> int:
  if exp.kind != "transformer":
    return exp.model.patch_size
  # The baseline has no K; 4 keeps its data interchangeable with CALM's K=4 data.
  return 4 if exp.data.block_length % 4 == 0 else 1


def prepare_data(exp: Experiment) -> dict:
  """The manifest of ``data.dir``, preparing it first when missing and ``data.auto_prepare``."""
  d = exp.data
  path = os.path.join(d.dir, data_lib.blocks.MANIFEST) if d.dir else ""
  if d.dir and not os.path.isfile(path) and d.auto_prepare:
    try:
      data_lib.blocks.check_out_dir(d.dir)   # auto-prepare replaces nothing but a prepared data set
    except data_lib.DataError as e:
      raise data_lib.DataError(f"data.dir: {e}") from None
    if jax.process_count() > 1:
      raise data_lib.DataError(f"data.dir: {d.dir} is not prepared; run launch.prepare once before a "
                               "multi-process job (auto_prepare is single-process only)")
    # Several processes on one machine (test workers, a sweep started twice) may auto-prepare the
    # same directory: the first one prepares it under an exclusive lock, the others wait and reuse it.
    import fcntl  # pylint: disable=import-outside-toplevel
    os.makedirs(os.path.dirname(os.path.abspath(d.dir)), exist_ok=True)
    with open(os.path.abspath(d.dir).rstrip(os.sep) + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.isfile(path):
        tok = (data_lib.load_tokenizer(d.tokenizer) if d.tokenizer
               else data_lib.load_tokenizer(None, vocab_size=d.vocab_size))
        _say(f"preparing {d.dir} from {d.source}")
        data_lib.prepare(d.source, d.dir, tok, d.block_length, _prepare_patch_size(exp), d.mode,
                         d.valid_fraction, valid_source_spec=d.valid_source or None)
  if not d.dir:
    raise data_lib.DataError("data.dir: not set (a directory written by `python -m launch.prepare`)")
  try:
    manifest = data_lib.load_manifest(d.dir)
  except data_lib.DataError as e:
    raise data_lib.DataError(f"data.dir: {e}") from None
  return manifest


def check_data(exp: Experiment, manifest: dict) -> data_lib.TextTokenizer:
  """The tokenizer of the run, after checking the prepared data against the config."""
  d, src = exp.data, exp.data.dir

  def mismatch(field, want, got):
    raise data_lib.DataError(f"{field}: {want!r} in the config, but {src} was prepared with {got!r}")

  if manifest["block_length"] != d.block_length:
    mismatch("data.block_length", d.block_length, manifest["block_length"])
  if manifest["mode"] != d.mode:
    mismatch("data.mode", d.mode, manifest["mode"])
  if exp.kind != "transformer" and manifest["patch_size"] != exp.model.patch_size:
    mismatch("model.patch_size", exp.model.patch_size, manifest["patch_size"])
  if manifest["vocab_size"] != exp.vocab_size:
    field = "model.backbone.vocab_size" if exp.kind != "autoencoder" else "model.vocab_size"
    mismatch(field, exp.vocab_size, manifest["vocab_size"])
  if d.tokenizer:
    try:
      tok = data_lib.load_tokenizer(d.tokenizer)
    except data_lib.DataError as e:
      raise data_lib.DataError(f"data.tokenizer: {e}") from None
    if tok.fingerprint != manifest["tokenizer_fingerprint"]:
      raise data_lib.DataError(f"data.tokenizer: {d.tokenizer} (fingerprint {tok.fingerprint[:12]}) is not "
                               f"the tokenizer {src} was prepared with "
                               f"({manifest['tokenizer_fingerprint'][:12]})")
  else:
    tok = data_lib.load_tokenizer(src)
  return tok


# --------------------------------------------------------------------------- state


def _load_autoencoder(exp: Experiment, mesh, rules):
  """The frozen stage-1 parameters, placed in their shardings (read-only: nothing writes them back)."""
  ckpt_dir = os.path.join(exp.ae_workdir, "checkpoints")
  shardings = sharding.param_shardings(exp.ae_model, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          models.abstract_params(exp.ae_model), shardings)
  try:
    return checkpoint.restore_params(ckpt_dir, abstract)
  except FileNotFoundError as e:
    raise checkpoint.CheckpointError(f"ae_workdir: {e}") from None


def _param_summary(params) -> str:
  parts = [f"{k} {models.count_params(v) / 1e6:.2f}M" for k, v in params.items()]
  return f"{models.count_params(params) / 1e6:.2f}M parameters ({', '.join(parts)})"


# --------------------------------------------------------------------------- evaluation


def evaluate(exp: Experiment, eval_fn, params, ae_params, mesh, key, pad_id: int) -> dict[str, float]:
  """Held-out metrics over ``train.eval_batches`` batches of the valid split (0: all of it)."""
  del pad_id
  it = data_lib.make_eval_iterator(exp.data.dir, "valid", exp.train.eval_batch_size)
  sums = None
  for i, batch in enumerate(it):
    if exp.train.eval_batches and i >= exp.train.eval_batches:
      break
    out = eval_fn(params, sharding.put_batch(mesh, batch), jax.random.fold_in(key, i), ae_params)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    return {}
  return trainers.finish_eval(jax.device_get(sums))


def evaluate_brierlm(exp: Experiment, params, ae_params, key, mesh=None) -> dict[str, float]:
  """BrierLM (x100) and Brier-1..4 on ``eval.num_blocks`` held-out pieces of ``eval.block_length``.

  With ``mesh`` the samples are drawn per device (``evaluate.evaluate_brier``);
  a batch then holds a multiple of data x fsdp pieces and of the process count
  in source blocks.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from calm_jax.evaluation import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel

  pieces = exp.data.block_length // exp.eval.block_length
  rows = max(1, -(-exp.train.eval_batch_size // pieces))   # source blocks per batch
  if mesh is not None:
    div = sharding.batch_divisor(mesh)
    step = math.lcm(div // math.gcd(div, pieces), jax.process_count())
    rows = -(-rows // step) * step
  it = data_lib.make_eval_iterator(exp.data.dir, "valid", rows)

  def batches():
    for batch in it:
      tokens = np.asarray(batch["tokens"])
      yield {"tokens": tokens.reshape(-1, exp.eval.block_length),
             "row_mask": np.repeat(np.asarray(batch["row_mask"]), pieces)}

  per_batch = rows * pieces
  r = evaluate_lib.evaluate_brier(exp.kind, exp.model, params, batches(), key, ae_cfg=exp.ae_model,
                                  ae_params=ae_params, num_batches=-(-exp.eval.num_blocks // per_batch),
                                  progress=False, mesh=mesh)
  out = {f"eval/brier{n}": float(r[f"brier{n}"]) for n in range(1, 5)}
  out.update({f"eval/brier{n}_se": float(r[f"brier{n}_se"]) for n in range(1, 5)})
  out["eval/brierlm"] = float(r["brierlm"])           # 0 when some Brier-n <= 0 (eval/at_chance = 1)
  out["eval/brierlm_se"] = float(r["brierlm_se"])
  out["eval/brierlm_reference"] = float(r["brierlm_reference"])   # the reference's formula, for comparison
  out["eval/at_chance"] = float(r["at_chance"])
  out["eval/block_length"] = float(r["block_length"])
  return out


# --------------------------------------------------------------------------- throughput


def train_flops_per_token(exp: Experiment) -> float:
  """Model FLOPs per trained token (``calm_jax.cost.flops``, the 'factored' convention)."""
  from calm_jax.cost import flops  # pylint: disable=import-outside-toplevel
  context = None
  if exp.kind == "energy":
    context = exp.data.block_length // exp.model.patch_size
  elif exp.kind == "transformer":
    context = exp.data.block_length
  return flops.train_flops_per_token(exp.kind, exp.model, ae_cfg=exp.ae_model, context=context)


def peak_flops(exp: Experiment) -> tuple[float, str]:
  """Peak FLOP/s of all devices together, and where the number comes from."""
  from calm_jax.cost import flops  # pylint: disable=import-outside-toplevel
  n = jax.device_count()
  if exp.train.peak_flops_per_device > 0:
    return exp.train.peak_flops_per_device * n, "train.peak_flops_per_device"
  dtype = getattr(exp.model, "dtype", None) or exp.model.backbone.dtype
  per_device, source = flops.device_peak_flops(jax.devices()[0], dtype)
  return per_device * n, source


# --------------------------------------------------------------------------- the loop


def run(config: Any, workdir: str) -> dict[str, float]:
  """Train (or resume) the experiment ``config`` in ``workdir``; returns the final eval metrics.

  Raises:
    ConfigError: an invalid config, or a workdir that holds something else (before anything starts).
    DataError: missing or mismatched data.
    CheckpointError: no readable checkpoint where one is needed (e.g. ``ae_workdir``).
    metrics.NonFiniteError: a NaN/Inf loss, gradient or state (names the step and the last finite
      checkpoint; nothing non-finite was saved).
    Preempted: SIGTERM; the state was saved (the step and directory are named).
  """
  exp = resolve(config)
  workdir = os.path.abspath(workdir)
  saved_config = check_workdir(workdir, exp.config_dict)
  try:
    mesh = sharding.mesh_from_config(exp.mesh)
  except sharding.ShardingError as e:
    raise ConfigError(str(e).removeprefix("config.")) from None
  rules = sharding.rules_from_config(exp.sharding_rules)
  if exp.train.global_batch_size % sharding.batch_divisor(mesh):
    raise ConfigError(f"train.global_batch_size: {exp.train.global_batch_size} is not divisible by the "
                      f"{sharding.batch_divisor(mesh)} devices of mesh.data x mesh.fsdp")
  _say(f"{exp.kind} -> {workdir}; {sharding.describe(mesh)}")
  with jax.set_mesh(mesh):   # the context mesh of every jit below
    return _train(exp, workdir, mesh, rules, saved_config)


def _check_workdir_tokenizer(workdir: str, tok) -> None:
  saved = os.path.join(workdir, "tokenizer")
  if not os.path.isfile(os.path.join(saved, "tokenizer.json")):
    return
  try:
    fingerprint = data_lib.load_tokenizer(saved).fingerprint
  except data_lib.DataError:
    return   # unreadable: the run's own copy is rewritten below
  if fingerprint != tok.fingerprint:
    raise data_lib.DataError(f"data.dir: tokenised with another tokenizer ({tok.fingerprint[:12]}) than the "
                             f"run in {workdir} ({fingerprint[:12]}); choose another workdir")


def _changes(saved: dict | None, ours: dict) -> str:
  if not saved:
    return ""
  saved = {k: v for k, v in saved.items() if k != "model"}
  ours = json.loads(json.dumps({k: v for k, v in ours.items() if k != "model"}, default=str))
  return _first_difference(saved, ours, "config") or ""


def jit_train_step(exp: Experiment, mesh, rules, tx=None):
  """``(step_jit, state_shardings)``: the loop's train step jitted for ``mesh`` (state donated).

  Also what :mod:`calm_jax.parallel.aot` compiles ahead of time for a target it
  is not running on, so that the plan checks the step that really runs.  CALM's
  frozen autoencoder arrives in :func:`sharding.param_shardings` of ``exp.ae_model``
  (where :func:`_load_autoencoder` puts it).
  """
  tx = trainers.make_optimizer(exp.optim) if tx is None else tx
  p_sh = sharding.param_shardings(exp.model, mesh, rules)
  state_sh = sharding.state_shardings(tx, models.abstract_params(exp.model), p_sh, mesh)
  step_fn = trainers.make_train_step(exp.kind, exp.model, exp.optim, tx, ae_cfg=exp.ae_model, mesh=mesh)
  step_fn = sharding.with_rules(step_fn, rules)   # the models' activation constraints read this table
  rep = sharding.replicated(mesh)
  ae_sh = sharding.param_shardings(exp.ae_model, mesh, rules) if exp.kind == "energy" else None
  step_jit = jax.jit(step_fn, donate_argnums=(0,),
                     in_shardings=(state_sh, sharding.batch_sharding(mesh), rep, ae_sh),
                     out_shardings=(state_sh, rep))
  return step_jit, state_sh


def _train(exp: Experiment, workdir: str, mesh, rules, saved_config: dict | None = None) -> dict[str, float]:
  """:func:`run` after the config and the mesh are settled, under ``jax.set_mesh(mesh)``."""

  manifest = prepare_data(exp)
  tok = check_data(exp, manifest)
  _check_workdir_tokenizer(workdir, tok)
  changed = _changes(saved_config, exp.config_dict)
  if changed:
    _say(f"config differs from the saved one ({changed.removeprefix('config.')}); config.json rewritten")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    metrics.save_config_json(workdir, exp.config_dict)
    tok.save(os.path.join(workdir, "tokenizer"))

  tx = trainers.make_optimizer(exp.optim)
  base = jax.random.key(exp.train.seed)
  init_key, train_key, eval_key = (jax.random.fold_in(base, i) for i in range(3))
  step_jit, state_sh = jit_train_step(exp, mesh, rules, tx)
  abstract = sharding.abstract_state(tx, models.abstract_params(exp.model), state_sh)

  ae_params = _load_autoencoder(exp, mesh, rules) if exp.kind == "energy" else None
  train_it = data_lib.make_train_iterator(exp.data.dir, "train", exp.train.global_batch_size, exp.train.seed)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_interval_steps=exp.train.checkpoint_every,
                                 max_to_keep=exp.train.keep_checkpoints, config=exp.config_dict)
  fresh = lambda: sharding.init_state_sharded(exp.model, tx, init_key, mesh, rules)[0]
  restored = checkpoint.resume_or_init(ckpt, abstract, fresh, data_iter=train_it)
  state, start = restored.state, int(restored.step)
  _say(f"{'resumed from ' + restored.path if restored.source == 'resume' else 'initialised'} at step "
       f"{start}; {_param_summary(state['params'])}")

  eval_fn = jax.jit(trainers.make_eval_step(exp.kind, exp.model, ae_cfg=exp.ae_model, pad_id=tok.pad_id,
                                            noise_sigma=exp.eval.ae_noise_sigma, mesh=mesh))
  brier_key = jax.random.fold_in(eval_key, 1 << 20)

  def run_eval(params):
    out = evaluate(exp, eval_fn, params, ae_params, mesh, eval_key, tok.pad_id)
    if exp.eval.brier:
      out.update(evaluate_brierlm(exp, params, ae_params, brier_key, mesh))
    return out

  total = exp.train.steps
  if start >= total:
    ckpt.close()
    _say(f"already trained to step {start} (train.steps={total}); evaluating only")
    return run_eval(state["params"])

  tokens_per_step = exp.train.global_batch_size * exp.data.block_length
  flops_per_token = train_flops_per_token(exp)
  peak, peak_source = peak_flops(exp)
  _say(f"{flops_per_token / 1e6:.3g} MFLOPs per token; peak {peak / 1e12:.3g} TFLOP/s over "
       f"{jax.device_count()} device(s) ({peak_source})")
  writer = metrics.MetricWriter(workdir, after_step=start)   # rows a killed run logged past `start` go
  deferred = metrics.DeferredMetrics()
  preempted = checkpoint.install_preemption_handler()
  bar = metrics.ProgressBar(total, start, desc=exp.kind)
  last_eval: dict[str, float] = {}
  # Throughput over each logging interval, timed from the first fetched step (compilation excluded).
  clock = {"t": None, "steps": 0}

  def consume(ready):
    if ready is None:
      return
    done, host = ready
    bar.update(done - 1, tokens_per_step, loss=host["train/loss"])
    now = time.perf_counter()
    if clock["t"] is None:
      clock["t"] = now
    else:
      clock["steps"] += 1
    if done % exp.train.log_every == 0 or done == total:
      host = dict(host)
      if clock["steps"]:
        seconds = now - clock["t"]
        tps = clock["steps"] * tokens_per_step / seconds
        host["perf/step_seconds"] = seconds / clock["steps"]
        host["perf/tokens_per_sec"] = tps
        host["perf/mfu"] = tps * flops_per_token / peak
      clock.update(t=now, steps=0)
      writer.write(done, host)

  def save(done, final=False):
    """Check ``state`` (its metrics were just fetched) and save it: nothing non-finite reaches the disk."""
    if not checkpoint.all_finite(state):
      raise metrics.NonFiniteError(done, {"state": "NaN/Inf in the parameters or optimizer state"},
                                   ckpt.latest_step())
    writer.sync()   # every row up to `done` is on disk before checkpoint `done` is
    if final:
      ckpt.save_final(done, state, train_it, check_finite=False)
    else:
      ckpt.maybe_save(done, state, train_it, force=True, check_finite=False)

  try:
    for step in range(start, total):
      done = step + 1   # the step number of the state this step produces
      batch = sharding.put_batch(mesh, next(train_it))
      state, m = step_jit(state, batch, train_key, ae_params)
      consume(deferred.push(done, m, last_good_checkpoint=ckpt.latest_step()))
      evaluate_now = done % exp.train.eval_every == 0 and done < total
      save_now = bool(preempted) or ckpt.should_save(done)
      if evaluate_now or save_now:
        consume(deferred.flush())   # this step's metrics first: neither eval nor a save may hide a NaN
      if evaluate_now:
        last_eval = run_eval(state["params"])
        writer.write(done, last_eval)
        bar.update(step, 0, **{k.removeprefix("eval/"): v for k, v in last_eval.items()
                               if k != "eval/count"})
        clock.update(t=None, steps=0)   # evaluation time is not training throughput
        bar.restart_rate()
      if save_now:
        save(done)
      if preempted:
        ckpt.wait()
        raise Preempted(done, ckpt.directory)
    consume(deferred.flush())
    last_eval = run_eval(state["params"])
    writer.write(total, last_eval)
    save(total, final=True)
  except metrics.NonFiniteError as e:
    raise metrics.NonFiniteError(e.step, e.bad, e.last_good_checkpoint, str(ckpt.directory)) from None
  finally:
    bar.close()
    writer.close()
    preempted.uninstall()
    ckpt.close()
  _say("final " + ", ".join(f"{k}={v:.4g}" for k, v in last_eval.items() if k != "eval/count"))
  return last_eval


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` (for tests and notebooks)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
