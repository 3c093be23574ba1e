"""Weight interop with the authors' PyTorch code (github shaochenze/calm).

Reads and writes Hugging Face-style folders: ``config.json`` plus
``model.safetensors`` or ``pytorch_model.bin`` (sharded ``*.index.json``
variants too), for the three model kinds:

  autoencoder  the reference's ``Autoencoder``      (keys ``encoder.*``, ``decoder.*``)
  energy       CALM with any head: the reference's ``EnergyTransformer`` (``transformer.*``,
               ``embed_proj.*``, the head under ``generative_head.*`` and again under
               ``mlp_generator.*``, and the frozen autoencoder under ``ae_model.*``),
               ``DiffusionTransformer`` or ``FlowTransformer`` (the head's network under
               ``generative_head.net.*``).  The head is told from the keys (the reference's
               ``save_pretrained`` writes ``model_type: ""``); each head lists its own keys
               (``reference_layout`` in :mod:`calm_jax.models.heads`).
  transformer  HF ``LlamaForCausalLM``              (``model.*``, untied ``lm_head.weight``)

Tensors are read without running pickled code: safetensors, or
``torch.load(weights_only=True)`` for ``.bin`` files (torch is an optional
extra).  Every key is accounted for: a missing or unexpected key, or a shape
mismatch, raises :class:`InteropError` naming the key.

Layout notes.  ``nn.Linear`` stores ``[out, in]``; our kernels are ``[in, out]``.
Attention projections are reshaped to ``[D, heads, head_dim]`` (query/key/value)
and ``[heads, head_dim, D]`` (output); HF rotates the two halves of each head,
as :func:`calm_jax.models.layers.apply_rotary` does, so no permutation is needed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

from calm_jax import models
from calm_jax.configs import HEAD_NAMES, AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.models import heads


class InteropError(ValueError):
  """A checkpoint does not match what the importer expects; the message names the key or file."""


# --------------------------------------------------------------------------- tensor files


def _read_safetensors(path):
  from safetensors.flax import load_file  # flax backend: bf16 works without torch
  return {k: np.asarray(v) for k, v in load_file(path).items()}


def _read_torch_bin(path):
  try:
    import torch
  except ImportError as e:
    raise InteropError(f"{path}: reading a .bin checkpoint needs PyTorch (pip install 'calm_jax[torch]'); "
                       "or convert it to model.safetensors") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickled code, corrupt file
    raise InteropError(f"{path}: cannot be read as a weights-only PyTorch state dict ({e})") from None
  out = {}
  for k, v in sd.items():
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[k] = v.numpy()
  return out


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint folder, by key (prefers safetensors)."""
  if not os.path.isdir(folder):
    raise InteropError(f"{folder}: checkpoint folder does not exist")
  for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                             ("pytorch_model.bin.index.json", _read_torch_bin)):
    index = os.path.join(folder, index_name)
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      sd = {}
      for shard in shards:
        p = os.path.join(folder, shard)
        if not os.path.exists(p):
          raise InteropError(f"{p}: shard named in {index_name} is missing")
        sd.update(reader(p))
      return sd
  for name, reader in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_torch_bin)):
    p = os.path.join(folder, name)
    if os.path.exists(p):
      try:
        return reader(p)
      except InteropError:
        raise
      except Exception as e:
        raise InteropError(f"{p}: cannot be read ({type(e).__name__}: {e})") from None
  raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin found")


def write_state_dict(folder: str, sd: dict[str, np.ndarray], fmt: str = "safetensors"):
  os.makedirs(folder, exist_ok=True)
  if fmt == "safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
  elif fmt == "bin":
    try:
      import torch
    except ImportError as e:
      raise InteropError("writing pytorch_model.bin needs PyTorch (pip install 'calm_jax[torch]')") from e
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
               os.path.join(folder, "pytorch_model.bin"))
  else:
    raise InteropError(f"unknown weight format {fmt!r} (use 'safetensors' or 'bin')")


def read_config_json(folder: str) -> dict[str, Any]:
  p = os.path.join(folder, "config.json")
  if not os.path.exists(p):
    raise InteropError(f"{p}: missing (a reference checkpoint folder has config.json beside its weights)")
  try:
    with open(p) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InteropError(f"{p}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- key maps
# An entry maps one of our parameter paths to one reference key with a layout transform.

def _linear(w):      # torch [out, in] -> kernel [in, out]
  return w.T


def _linear_t(k):    # kernel [in, out] -> torch [out, in]
  return k.T


_Entry = tuple[tuple[str, ...], str, Callable, Callable]   # (our path, ref key, to_ours, to_ref)


def _lin(ours, ref, bias=True):
  out = [(ours + ("kernel",), ref + ".weight", _linear, _linear_t)]
  if bias:
    out.append((ours + ("bias",), ref + ".bias", _copy, _copy))
  return out


def _copy(x):
  return x


def _norm(ours, ref, bias=False):
  out = [(ours + ("scale",), ref + ".weight", _copy, _copy)]
  if bias:
    out.append((ours + ("bias",), ref + ".bias", _copy, _copy))
  return out


def _mlp(ours, ref):
  return sum((_lin(ours + (p,), f"{ref}.{p}", bias=False) for p in ("gate_proj", "up_proj", "down_proj")), [])


def autoencoder_keymap(cfg: AutoencoderConfig, prefix: str = "") -> list[_Entry]:
  e = [(("encoder", "embed_tokens", "embedding"), prefix + "encoder.embed_tokens.weight", _copy, _copy)]
  for side, n, name in (("encoder", cfg.num_encoder_layers, "encoder_layers"),
                        ("decoder", cfg.num_decoder_layers, "decoder_layers")):
    for i in range(n):
      e += _norm((side, f"layers_{i}", "layernorm"), f"{prefix}{side}.{name}.{i}.layernorm")
      e += _mlp((side, f"layers_{i}", "mlp"), f"{prefix}{side}.{name}.{i}.mlp")
    e += _norm((side, "norm"), f"{prefix}{side}.norm")
  e += _lin(("encoder", "squeeze"), prefix + "encoder.squeeze_layer")
  e += _lin(("encoder", "hidden_to_latent"), prefix + "encoder.hidden_to_latent")
  e += _lin(("decoder", "latent_to_hidden"), prefix + "decoder.latent_to_hidden")
  e += _lin(("decoder", "expand"), prefix + "decoder.expand_layer")
  return e


def _llama_keymap(cfg: LlamaConfig, ours: tuple[str, ...], ref: str) -> list[_Entry]:
  d, h, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  q_in = lambda w: w.T.reshape(d, h, dh)
  q_out = lambda k: k.reshape(d, h * dh).T
  kv_in = lambda w: w.T.reshape(d, g, dh)
  kv_out = lambda k: k.reshape(d, g * dh).T
  o_in = lambda w: w.T.reshape(h, dh, d)
  o_out = lambda k: k.reshape(h * dh, d).T
  e = [(ours + ("embed_tokens", "embedding"), f"{ref}.embed_tokens.weight", _copy, _copy)]
  for i in range(cfg.num_hidden_layers):
    lo, lr = ours + (f"layers_{i}",), f"{ref}.layers.{i}"
    e += [(lo + ("self_attn", "q_proj", "kernel"), f"{lr}.self_attn.q_proj.weight", q_in, q_out),
          (lo + ("self_attn", "k_proj", "kernel"), f"{lr}.self_attn.k_proj.weight", kv_in, kv_out),
          (lo + ("self_attn", "v_proj", "kernel"), f"{lr}.self_attn.v_proj.weight", kv_in, kv_out),
          (lo + ("self_attn", "o_proj", "kernel"), f"{lr}.self_attn.o_proj.weight", o_in, o_out)]
    e += _mlp(lo + ("mlp",), f"{lr}.mlp")
    e += _norm(lo + ("input_layernorm",), f"{lr}.input_layernorm")
    e += _norm(lo + ("post_attention_layernorm",), f"{lr}.post_attention_layernorm")
  e += _norm(ours + ("norm",), f"{ref}.norm")
  return e


def _head_keymap(cfg: EnergyConfig, ref: str) -> list[_Entry]:
  """The generative head's entries, from the head's own layout (``heads.get(cfg).reference_layout()``)."""
  e = []
  for path, key, kind in heads.get(cfg).reference_layout():
    ours, r = ("generative_head",) + tuple(path), f"{ref}.{key}"
    e += _lin(ours, r) if kind == "linear" else _norm(ours, r, kind == "norm_bias")
  return e


def energy_keymap(cfg: EnergyConfig, head_prefix: str = "generative_head") -> list[_Entry]:
  e = _llama_keymap(cfg.backbone, ("transformer",), "transformer")
  e += _lin(("embed_proj_0",), "embed_proj.0") + _lin(("embed_proj_2",), "embed_proj.2")
  e += _norm(("embed_proj_3",), "embed_proj.3", True)
  return e + _head_keymap(cfg, head_prefix)


def transformer_keymap(cfg: TransformerConfig) -> list[_Entry]:
  return _llama_keymap(cfg.backbone, ("model",), "model") + [
      (("lm_head", "kernel"), "lm_head.weight", _linear, _linear_t)]


# Keys the reference may store that carry no parameters of their own.
def _ignorable(key: str) -> bool:
  return key.endswith("rotary_emb.inv_freq")


# --------------------------------------------------------------------------- scan <-> per-layer


def _unstack_layers(tree, n):
  """Scanned ``{'layers': stacked}`` -> ``{'layers_0': ..., ...}`` (for the key maps)."""
  if isinstance(tree, dict):
    if "layers" in tree and not any(k.startswith("layers_") for k in tree):
      out = {k: _unstack_layers(v, n) for k, v in tree.items() if k != "layers"}
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), tree["layers"])
      return out
    return {k: _unstack_layers(v, n) for k, v in tree.items()}
  return tree


def _index(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def _stack_layers(tree, n):
  if isinstance(tree, dict):
    if "layers_0" in tree and "norm" in tree and "embed_tokens" in tree:
      out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
      out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[tree[f"layers_{i}"] for i in range(n)])
      return out
    return {k: _stack_layers(v, n) for k, v in tree.items()}
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _expected_shapes(cfg):
  """ShapeDtypeStructs of the parameters, in the per-layer layout the key maps use."""
  abstract = models.abstract_params(cfg)
  n = cfg.backbone.num_hidden_layers if hasattr(cfg, "backbone") else 0
  return _unstack_layers(abstract, n) if n else abstract


def _import_entries(entries, sd, consumed, expected, where):
  params = {}
  for ours, key, to_ours, _ in entries:
    if key not in sd:
      raise InteropError(f"{where}: missing key {key!r}")
    value = to_ours(np.asarray(sd[key])) if sd[key].ndim else np.asarray(sd[key])
    try:
      sds = _get(expected, ours)
      shape, dtype = tuple(sds.shape), sds.dtype
    except (KeyError, TypeError):
      raise InteropError(f"{where}: no parameter {'/'.join(ours)} for key {key!r}") from None
    if sd[key].size != int(np.prod(shape)) or tuple(value.shape) != shape:
      raise InteropError(f"{where}: key {key!r} has shape {tuple(sd[key].shape)}, expected a tensor that "
                         f"maps to {shape} ({'/'.join(ours)})")
    _set(params, ours, value.astype(dtype))
    consumed.add(key)
  return params


def _check_unexpected(sd, consumed, where, allowed_prefixes=()):
  extra = sorted(k for k in sd if k not in consumed and not _ignorable(k)
                 and not any(k.startswith(p) for p in allowed_prefixes))
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise InteropError(f"{where}: unexpected key {extra[0]!r}{more}")


# --------------------------------------------------------------------------- configs


def _refuse(cond, where, msg):
  if cond:
    raise InteropError(f"{where}: {msg}")


def _llama_cfg_from_json(c, where, **overrides) -> LlamaConfig:
  _refuse(c.get("hidden_act", "silu") != "silu", where, f"hidden_act={c.get('hidden_act')!r}; only 'silu'")
  _refuse(bool(c.get("attention_bias", False)), where, "attention_bias=true is not supported")
  _refuse(bool(c.get("mlp_bias", False)), where, "mlp_bias=true is not supported")
  _refuse(c.get("rope_scaling") not in (None, {}), where, f"rope_scaling={c.get('rope_scaling')} not supported")
  heads = c["num_attention_heads"]
  hd = c.get("head_dim")
  _refuse(hd not in (None, c["hidden_size"] // heads), where, f"head_dim={hd} != hidden_size/heads")
  return LlamaConfig(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
      num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
      num_key_value_heads=c.get("num_key_value_heads") or heads,
      max_position_embeddings=c.get("max_position_embeddings", 2048), rope_theta=c.get("rope_theta", 10000.0),
      rms_norm_eps=c.get("rms_norm_eps", 1e-6), initializer_range=c.get("initializer_range", 0.02), **overrides)


def autoencoder_config_from_json(c: dict, where: str = "config.json", **overrides) -> AutoencoderConfig:
  _refuse(c.get("hidden_act", "silu") != "silu", where, f"hidden_act={c.get('hidden_act')!r}; only 'silu'")
  _refuse(bool(c.get("mlp_bias", False)), where, "mlp_bias=true is not supported")
  fields = ("vocab_size", "hidden_size", "intermediate_size", "latent_size", "patch_size", "num_encoder_layers",
            "num_decoder_layers", "ae_dropout", "kl_clamp", "kl_weight", "rms_norm_eps", "initializer_range")
  missing = [f for f in ("vocab_size", "hidden_size", "latent_size", "patch_size") if f not in c]
  _refuse(bool(missing), where, f"missing field {missing[0]!r} for an autoencoder config" if missing else "")
  return AutoencoderConfig(**{f: c[f] for f in fields if f in c}, **overrides)


# Head fields calm_jax writes into config.json beside the reference's (the reference keeps them as
# attributes and ignores them).
_HEAD_FIELDS = ("diffusion_sampling_steps", "flow_sampling_steps", "flow_solver")


def energy_config_from_json(c: dict, where: str = "config.json", head: str | None = None,
                            **overrides) -> EnergyConfig:
  """A CALM config; ``head`` (from the state dict's keys) must agree with a non-empty ``model_type``."""
  mt = c.get("model_type", "") or ""
  _refuse(mt not in ("", "calm") + HEAD_NAMES, where,
          f"model_type={mt!r}: not a CALM model (heads: {', '.join(HEAD_NAMES)})")
  if head is None:
    head = mt if mt in HEAD_NAMES else "energy"
  _refuse(mt in HEAD_NAMES and mt != head, where,
          f"model_type={mt!r} but the weights hold a {head!r} head")
  extra = {f: c[f] for f in _HEAD_FIELDS if f in c}
  return EnergyConfig(backbone=_llama_cfg_from_json(c, where, **overrides),
                      patch_size=c.get("patch_size", 4), latent_size=c.get("latent_size", 128),
                      noise_size=c.get("noise_size", 64), num_mlp_layers=c.get("num_mlp_layers", 4),
                      num_samples=c.get("num_samples", 8), beta=c.get("beta", 1.0), head=head, **extra)


def detect_head(sd, latent_size: int, where: str) -> str:
  """Which generative head a reference CALM state dict holds (under ``generative_head.``)."""
  found = [name for name, cls in heads.HEADS.items() if cls.in_state_dict(sd, "generative_head", latent_size)]
  if len(found) != 1:
    raise InteropError(f"{where}: missing key 'generative_head.noise_embd.weight' or "
                       "'generative_head.net.final_layer.linear.weight' (no generative head found)"
                       if not found else f"{where}: the keys match several heads {found}")
  return found[0]


def transformer_config_from_json(c: dict, where: str = "config.json", **overrides) -> TransformerConfig:
  _refuse(bool(c.get("tie_word_embeddings", False)), where,
          "tie_word_embeddings=true: the baseline has an untied LM head")
  return TransformerConfig(backbone=_llama_cfg_from_json(c, where, **overrides))


def detect_kind(config_json: dict, sd_keys=()) -> str:
  if "num_encoder_layers" in config_json or "latent_size" in config_json and "num_hidden_layers" not in \
      config_json:
    return "autoencoder"
  if "noise_size" in config_json or "ae_path" in config_json or any(k.startswith("embed_proj.") for k in sd_keys):
    return "energy"
  if config_json.get("model_type") == "llama" or any(k.startswith("lm_head.") for k in sd_keys):
    return "transformer"
  raise InteropError("cannot tell the model kind from config.json; pass kind= explicitly")


# --------------------------------------------------------------------------- import


def _finish(params, cfg):
  n = cfg.backbone.num_hidden_layers if hasattr(cfg, "backbone") else 0
  return _stack_layers(params, n) if n and cfg.backbone.scan_layers else params


def import_autoencoder(folder: str, **cfg_overrides):
  """Reference autoencoder folder -> ``(AutoencoderConfig, params)``."""
  cfg = autoencoder_config_from_json(read_config_json(folder), os.path.join(folder, "config.json"),
                                     **cfg_overrides)
  sd = read_state_dict(folder)
  return cfg, autoencoder_params_from_state_dict(cfg, sd, folder)


def autoencoder_params_from_state_dict(cfg, sd, where, prefix=""):
  consumed: set[str] = set()
  params = _import_entries(autoencoder_keymap(cfg, prefix), sd, consumed, _expected_shapes(cfg), where)
  tied = prefix + "decoder.lm_head_weight"   # the tied matrix, stored by some saves
  if tied in sd:
    if not np.array_equal(sd[tied], sd[prefix + "encoder.embed_tokens.weight"]):
      raise InteropError(f"{where}: key {tied!r} differs from the encoder embedding it must be tied to")
    consumed.add(tied)
  if not prefix:
    _check_unexpected(sd, consumed, where)
  return params if not prefix else (params, consumed)


def import_energy(folder: str, ae_folder: str | None = None, **cfg_overrides):
  """Reference CALM folder (any head) -> ``(EnergyConfig, params, AutoencoderConfig, ae_params)``.

  The frozen autoencoder comes from the ``ae_model.*`` keys of the same file
  (the released configs' ``ae_path`` points at the authors' machine), or from
  ``ae_folder`` when given or when the file has no ``ae_model.*`` keys.
  """
  where = folder
  cj = read_config_json(folder)
  sd = read_state_dict(folder)
  has = lambda prefix: any(k.startswith(prefix + ".") for k in sd)
  if not has("generative_head") and has("mlp_generator"):
    prefixes = ["mlp_generator"]
    head = "energy"
  else:
    head = detect_head(sd, cj.get("latent_size", 128), where)
    prefixes = ["generative_head"] + [p for p in heads.HEADS[head].reference_twins
                                      if any(k.startswith(p + ".") for k in sd)]
  cfg = energy_config_from_json(cj, os.path.join(folder, "config.json"), head=head, **cfg_overrides)
  consumed: set[str] = set()
  expected = _expected_shapes(cfg)
  params = _import_entries(energy_keymap(cfg, prefixes[0]), sd, consumed, expected, where)
  for other in prefixes[1:]:   # the same head registered twice: must agree
    for _, key, _, _ in _head_keymap(cfg, other):
      twin = prefixes[0] + key[len(other):]
      if key not in sd:
        raise InteropError(f"{where}: missing key {key!r} (the head's second copy is incomplete)")
      if not np.array_equal(sd[key], sd[twin]):
        raise InteropError(f"{where}: key {key!r} differs from {twin!r}; they are the same module")
      consumed.add(key)
  has_ae = any(k.startswith("ae_model.") for k in sd)
  if ae_folder is not None or not has_ae:
    if ae_folder is None:
      ae_folder = cj.get("ae_path")
      if not ae_folder or not os.path.isdir(ae_folder):
        raise InteropError(f"{where}: no ae_model.* keys and ae_path={ae_folder!r} is not a folder here; "
                           "pass the autoencoder folder explicitly")
    ae_cfg, ae_params = import_autoencoder(ae_folder)
    _check_unexpected(sd, consumed, where, allowed_prefixes=("ae_model.",))
  else:
    ae_json = os.path.join(folder, "ae_config.json")
    ae_cfg_json = None
    if os.path.exists(ae_json):
      with open(ae_json) as f:
        ae_cfg_json = json.load(f)
    elif cj.get("ae_path") and os.path.exists(os.path.join(cj["ae_path"], "config.json")):
      ae_cfg_json = read_config_json(cj["ae_path"])
    ae_cfg = _infer_ae_config(sd, cfg, ae_cfg_json, where)
    ae_params, used = autoencoder_params_from_state_dict(ae_cfg, sd, where, prefix="ae_model.")
    consumed |= used
    _check_unexpected(sd, consumed, where)
  if ae_cfg.latent_size != cfg.latent_size or ae_cfg.patch_size != cfg.patch_size:
    raise InteropError(f"{where}: autoencoder latent_size/patch_size ({ae_cfg.latent_size}/{ae_cfg.patch_size}) "
                       f"do not match the model's ({cfg.latent_size}/{cfg.patch_size})")
  return cfg, _finish(params, cfg), ae_cfg, ae_params


def _infer_ae_config(sd, cfg: EnergyConfig, cj, where) -> AutoencoderConfig:
  """The autoencoder's config from its tensors (and its config.json when one is at hand)."""
  if cj is not None:
    return autoencoder_config_from_json(cj, where)
  emb = sd.get("ae_model.encoder.embed_tokens.weight")
  if emb is None:
    raise InteropError(f"{where}: missing key 'ae_model.encoder.embed_tokens.weight'")
  v, d = emb.shape
  n_enc = len({k.split(".")[3] for k in sd if k.startswith("ae_model.encoder.encoder_layers.")})
  n_dec = len({k.split(".")[3] for k in sd if k.startswith("ae_model.decoder.decoder_layers.")})
  ff = sd["ae_model.encoder.encoder_layers.0.mlp.gate_proj.weight"].shape[0]
  return AutoencoderConfig(vocab_size=v, hidden_size=d, intermediate_size=ff, latent_size=cfg.latent_size,
                           patch_size=cfg.patch_size, num_encoder_layers=n_enc, num_decoder_layers=n_dec)


def import_transformer(folder: str, **cfg_overrides):
  """HF ``LlamaForCausalLM`` folder -> ``(TransformerConfig, params)``."""
  cfg = transformer_config_from_json(read_config_json(folder), os.path.join(folder, "config.json"),
                                     **cfg_overrides)
  sd = read_state_dict(folder)
  consumed: set[str] = set()
  params = _import_entries(transformer_keymap(cfg), sd, consumed, _expected_shapes(cfg), folder)
  _check_unexpected(sd, consumed, folder)
  return cfg, _finish(params, cfg)


# --------------------------------------------------------------------------- export


def _export_entries(entries, params, cfg):
  n = cfg.backbone.num_hidden_layers if hasattr(cfg, "backbone") else 0
  flat = _unstack_layers(jax.tree.map(np.asarray, params), n) if n else jax.tree.map(np.asarray, params)
  return {key: np.asarray(to_ref(_get(flat, ours)), np.float32) for ours, key, _, to_ref in entries}


def autoencoder_config_json(cfg: AutoencoderConfig, pad_token_id=None, eos_token_id=None) -> dict:
  d = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype")}
  d.update(hidden_act="silu", mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=2048,
           pretraining_tp=1, pad_token_id=pad_token_id, bos_token_id=1,
           eos_token_id=2 if eos_token_id is None else eos_token_id, architectures=["Autoencoder"],
           torch_dtype="float32")
  return d


def _llama_json(b: LlamaConfig) -> dict:
  return dict(vocab_size=b.vocab_size, hidden_size=b.hidden_size, intermediate_size=b.intermediate_size,
              num_hidden_layers=b.num_hidden_layers, num_attention_heads=b.num_attention_heads,
              num_key_value_heads=b.num_key_value_heads, max_position_embeddings=b.max_position_embeddings,
              rope_theta=b.rope_theta, rms_norm_eps=b.rms_norm_eps, initializer_range=b.initializer_range,
              hidden_act="silu", attention_bias=False, attention_dropout=0.0, mlp_bias=False, rope_scaling=None,
              pretraining_tp=1, tie_word_embeddings=False, torch_dtype="float32", use_cache=True)


def _write_json(folder, d):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)


def export_autoencoder(folder: str, cfg: AutoencoderConfig, params, fmt: str = "safetensors", **json_kw):
  """Writes the autoencoder, including the tied ``decoder.lm_head_weight``.

  The tied matrix is stored explicitly: the reference's ``from_pretrained``
  unties it on load and, when the key is absent (a safetensors save by
  ``save_pretrained``), leaves the decoder's output matrix uninitialised.
  """
  sd = _export_entries(autoencoder_keymap(cfg), params, cfg)
  sd["decoder.lm_head_weight"] = sd["encoder.embed_tokens.weight"]
  write_state_dict(folder, sd, fmt)
  _write_json(folder, autoencoder_config_json(cfg, **json_kw))
  return sd


def export_energy(folder: str, cfg: EnergyConfig, params, ae_cfg: AutoencoderConfig, ae_params,
                  fmt: str = "safetensors", pad_token_id=None, eos_token_id=2):
  """Writes the reference's layout (for the head of ``cfg.head``): the energy head under both prefixes,
  the others' network under ``generative_head.net.*``; the autoencoder
  under ``ae_model.*`` (with its tied ``decoder.lm_head_weight``), and a copy of
  the autoencoder in ``folder/autoencoder`` that ``config.json``'s ``ae_path``
  points at (the reference loads its autoencoder from there)."""
  sd = _export_entries(energy_keymap(cfg), params, cfg)
  for twin in heads.get(cfg).reference_twins:
    for _, key, _, to_ref in _head_keymap(cfg, "generative_head"):
      sd[twin + key[len("generative_head"):]] = sd[key]
  ae_sd = export_autoencoder(os.path.join(folder, "autoencoder"), ae_cfg, ae_params, fmt,
                             pad_token_id=pad_token_id, eos_token_id=eos_token_id)
  sd.update({"ae_model." + k: v for k, v in ae_sd.items()})
  write_state_dict(folder, sd, fmt)
  d = _llama_json(cfg.backbone)
  d.update(ae_path=os.path.abspath(os.path.join(folder, "autoencoder")), model_type=cfg.head,
           patch_size=cfg.patch_size, latent_size=cfg.latent_size, noise_size=cfg.noise_size,
           num_mlp_layers=cfg.num_mlp_layers, num_samples=cfg.num_samples, beta=cfg.beta,
           pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=eos_token_id,
           architectures=[heads.get(cfg).reference_class])
  if cfg.head != "energy":
    d.update({f: getattr(cfg, f) for f in _HEAD_FIELDS})
  _write_json(folder, d)
  return sd


def export_transformer(folder: str, cfg: TransformerConfig, params, fmt: str = "safetensors",
                       pad_token_id=None, eos_token_id=2):
  sd = _export_entries(transformer_keymap(cfg), params, cfg)
  write_state_dict(folder, sd, fmt)
  d = _llama_json(cfg.backbone)
  d.update(model_type="llama", architectures=["LlamaForCausalLM"], pad_token_id=pad_token_id, bos_token_id=1,
           eos_token_id=eos_token_id)
  _write_json(folder, d)
  return sd
