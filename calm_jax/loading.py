"""Loading a trained model for evaluation and generation (shared contract (d)).

``load_trained(path, step=None)`` accepts either

  * a calm_jax training workdir (layout (b)): ``config.json`` (the resolved
    experiment config: ``kind``, ``model``, ``ae_workdir``, ...),
    ``checkpoints/`` (orbax; the state's ``params`` subtree is read, nothing
    else) and ``tokenizer/``.  An energy run's autoencoder is loaded the same way
    from ``config.ae_workdir`` (its latest step); or
  * a reference Hugging Face folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), converted on the fly with :mod:`calm_jax.interop`;
    a ``tokenizer.json`` beside it is used when present.

and returns a :class:`Trained`.  Every failure is one line naming the workdir
or file.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from calm_jax import interop, models
from calm_jax.configs import AutoencoderConfig, ConfigError, EnergyConfig, TransformerConfig
from calm_jax.training import checkpoint

_CONFIG_TYPES = {"autoencoder": AutoencoderConfig, "energy": EnergyConfig, "transformer": TransformerConfig}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


class LoadError(ValueError):
  """A workdir or model folder cannot be loaded; the message names the file."""


class Trained(NamedTuple):
  """A trained model ready for inference.

  kind:        'autoencoder' | 'energy' | 'transformer'.
  cfg:         the model dataclass (AutoencoderConfig / EnergyConfig / TransformerConfig).
  params:      its parameters (host-default device arrays).
  ae_cfg, ae_params: the frozen autoencoder of an energy model (None otherwise).
  tokenizer:   a calm_jax.data.TextTokenizer, or None when the folder has none.
  config_dict: the experiment config.json (workdir) or the HF config.json (folder),
               plus ``_source`` ('workdir' | 'hf') and ``_step`` (restored step or None).
  """
  kind: str
  cfg: Any
  params: Any
  ae_cfg: AutoencoderConfig | None
  ae_params: Any
  tokenizer: Any
  config_dict: dict


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise LoadError(f"{path}: no such file") from None
  except json.JSONDecodeError as e:
    raise LoadError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def is_hf_folder(path: str) -> bool:
  """True for a reference / Hugging Face model folder (weights file, no ``checkpoints/``)."""
  return (not os.path.isdir(os.path.join(path, "checkpoints"))
          and any(os.path.exists(os.path.join(path, f)) for f in _WEIGHT_FILES))


def checkpoint_steps(workdir: str) -> list[int]:
  """Step numbers present under ``workdir/checkpoints`` (sorted)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _restore(workdir: str, cfg, step: int | None):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise LoadError(f"{ckpt_dir}: no checkpoint steps (train first, or pass a reference model folder)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise LoadError(f"{ckpt_dir}: no step {step} (have {steps})")
  try:
    params = checkpoint.restore_params(os.path.join(ckpt_dir, str(step)), models.abstract_params(cfg),
                                       key="params")
  except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
    raise LoadError(f"{ckpt_dir}/{step}: cannot restore params ({str(e).splitlines()[0]})") from None
  return params, step


def _model_config(kind: str, model: Any, where: str):
  if kind not in _CONFIG_TYPES:
    raise LoadError(f"{where}: kind={kind!r} is not one of {tuple(_CONFIG_TYPES)}")
  if not isinstance(model, dict):
    raise LoadError(f"{where}: 'model' must be a dict of the {_CONFIG_TYPES[kind].__name__} fields")
  try:
    return _CONFIG_TYPES[kind].from_dict(model, prefix="model")
  except ConfigError as e:
    raise LoadError(f"{where}: {e}") from None


def _load_tokenizer(directory: str):
  from calm_jax.data import DataError, load_tokenizer  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return None
  try:
    return load_tokenizer(directory)
  except DataError as e:
    raise LoadError(str(e)) from None


def _load_workdir(workdir: str, step: int | None) -> Trained:
  config_path = os.path.join(workdir, "config.json")
  config = _read_json(config_path)
  kind = config.get("kind")
  cfg = _model_config(kind, config.get("model"), config_path)
  params, step = _restore(workdir, cfg, step)
  ae_cfg = ae_params = None
  if kind == "energy":
    ae_workdir = config.get("ae_workdir") or ""
    if not ae_workdir:
      raise LoadError(f"{config_path}: ae_workdir is empty; an energy model needs its autoencoder's workdir")
    if not os.path.isabs(ae_workdir) and not os.path.isdir(ae_workdir):
      ae_workdir = os.path.join(workdir, ae_workdir)
    ae = load_trained(ae_workdir)
    if ae.kind != "autoencoder":
      raise LoadError(f"{config_path}: ae_workdir={ae_workdir} holds a {ae.kind!r} run, not an autoencoder")
    if (ae.cfg.latent_size, ae.cfg.patch_size) != (cfg.latent_size, cfg.patch_size):
      raise LoadError(f"{config_path}: autoencoder latent_size/patch_size ({ae.cfg.latent_size}/"
                      f"{ae.cfg.patch_size}) do not match model ({cfg.latent_size}/{cfg.patch_size})")
    ae_cfg, ae_params = ae.cfg, ae.params
  tokenizer = _load_tokenizer(os.path.join(workdir, "tokenizer"))
  if tokenizer is None and isinstance(config.get("data"), dict) and config["data"].get("dir"):
    tokenizer = _load_tokenizer(config["data"]["dir"])   # prepare() saves the tokenizer there too
  return Trained(kind, cfg, params, ae_cfg, ae_params, tokenizer,
                 dict(config, _source="workdir", _step=step))


def _load_hf(folder: str) -> Trained:
  try:
    cj = interop.read_config_json(folder)
    kind = interop.detect_kind(cj, interop.read_state_dict(folder).keys())
    ae_cfg = ae_params = None
    if kind == "autoencoder":
      cfg, params = interop.import_autoencoder(folder)
    elif kind == "energy":
      cfg, params, ae_cfg, ae_params = interop.import_energy(folder)
    else:
      cfg, params = interop.import_transformer(folder)
  except interop.InteropError as e:
    raise LoadError(f"{folder}: {e}") from None
  return Trained(kind, cfg, params, ae_cfg, ae_params, _load_tokenizer(folder),
                 dict(cj, _source="hf", _step=None))


def saved_kind(path: str) -> str | None:
  """The ``kind`` in a calm_jax workdir's ``config.json``, read without loading any weights.

  None for a reference model folder (its kind is told by its weights) or where
  nothing says; :func:`load_trained` reports the errors.
  """
  path = os.path.expanduser(str(path))
  if not os.path.isdir(path) or is_hf_folder(path):
    return None
  try:
    with open(os.path.join(path, "config.json")) as f:
      kind = json.load(f).get("kind")
  except (OSError, ValueError, AttributeError):
    return None
  return kind if kind in _CONFIG_TYPES else None


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """Loads a calm_jax workdir (its latest step, or ``step``) or a reference HF folder."""
  workdir = os.path.expanduser(str(workdir))
  if not os.path.isdir(workdir):
    raise LoadError(f"{workdir}: no such directory")
  if is_hf_folder(workdir):
    if step is not None:
      raise LoadError(f"{workdir}: a reference model folder has no steps (step={step})")
    return _load_hf(workdir)
  return _load_workdir(workdir, step)


def special_ids(trained: Trained) -> tuple[int, int]:
  """(eos_id, pad_id): from the tokenizer, else from an HF config.json."""
  if trained.tokenizer is not None:
    return trained.tokenizer.eos_id, trained.tokenizer.pad_id
  cj = trained.config_dict
  eos, pad = cj.get("eos_token_id"), cj.get("pad_token_id")
  if isinstance(eos, list):
    eos = eos[0]
  vocab = trained.cfg.backbone.vocab_size if hasattr(trained.cfg, "backbone") else trained.cfg.vocab_size
  # The reference adds [PAD] as the last id when the tokenizer has none.
  return (int(eos) if eos is not None else 2), (int(pad) if pad is not None else vocab - 1)
