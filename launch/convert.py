r"""Convert checkpoints between the authors' PyTorch layout and calm_jax workdirs.

Import a reference folder (config.json + model.safetensors / pytorch_model.bin)
into a calm_jax workdir that ``launch/evaluate.py`` and ``launch/generate.py``
read::

  python -m launch.convert --direction=import --src=/ckpt/calm_m --dst=runs/calm_m \
      [--kind=energy] [--ae_src=/ckpt/autoencoder] [--tokenizer=/ckpt/llama3_tokenizer]

An energy model's frozen autoencoder is taken from the ``ae_model.*`` keys of
the same file (or ``--ae_src``) and written as its own workdir ``DST/autoencoder``.

Export a calm_jax workdir back to the reference's layout::

  python -m launch.convert --direction=export --src=runs/calm_m --dst=/tmp/calm_m_hf [--format=bin]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"], "import: reference -> calm_jax.")
_SRC = flags.DEFINE_string("src", None, "Source folder (reference folder or calm_jax workdir).")
_DST = flags.DEFINE_string("dst", None, "Destination folder.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "autoencoder", "energy", "transformer"], "Model kind.")
_AE_SRC = flags.DEFINE_string("ae_src", None, "Reference autoencoder folder for an energy model.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json or its folder, copied into the workdir.")
_FORMAT = flags.DEFINE_enum("format", "safetensors", ["safetensors", "bin"], "Export weight format.")


def import_reference(src, dst, kind="auto", ae_src=None, tokenizer=None):
  """Reference folder -> calm_jax workdir(s).  Returns the list of workdirs written."""
  import jax.numpy as jnp  # noqa: F401  (jax before orbax)

  from calm_jax import interop
  from calm_jax.training import checkpoint, metrics

  if os.path.exists(os.path.join(dst, "checkpoints")):
    raise interop.InteropError(f"{dst}: already holds checkpoints; choose another --dst (nothing overwritten)")
  cj = interop.read_config_json(src)
  if kind == "auto":
    kind = interop.detect_kind(cj, interop.read_state_dict(src).keys())
  written = []

  def save(workdir, kind, cfg, params, extra=None):
    config = {"kind": kind, "model": cfg.to_dict(), "imported_from": os.path.abspath(src)}
    config.update(extra or {})
    metrics.save_config_json(workdir, config)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1,
                                 config=config, async_save=False) as ck:
      ck.save_final(0, {"step": jnp.zeros((), jnp.int32), "params": params})
    if tokenizer:
      from calm_jax import data
      data.load_tokenizer(tokenizer).save(os.path.join(workdir, "tokenizer"))
    written.append(workdir)

  if kind == "autoencoder":
    cfg, params = interop.import_autoencoder(src)
    save(dst, kind, cfg, params)
  elif kind == "transformer":
    cfg, params = interop.import_transformer(src)
    save(dst, kind, cfg, params)
  else:
    cfg, params, ae_cfg, ae_params = interop.import_energy(src, ae_folder=ae_src)
    ae_dir = os.path.join(dst, "autoencoder")
    save(ae_dir, "autoencoder", ae_cfg, ae_params)
    save(dst, "energy", cfg, params, {"ae_workdir": os.path.abspath(ae_dir)})
  return written


def export_workdir(src, dst, fmt="safetensors"):
  from calm_jax import interop, loading
  t = loading.load_trained(src)
  if t.kind == "autoencoder":
    interop.export_autoencoder(dst, t.cfg, t.params, fmt)
  elif t.kind == "transformer":
    interop.export_transformer(dst, t.cfg, t.params, fmt)
  else:
    interop.export_energy(dst, t.cfg, t.params, t.ae_cfg, t.ae_params, fmt)
  if getattr(t, "tokenizer", None) is not None:
    t.tokenizer.save(dst)
  return dst


def main(argv):
  del argv
  if not _SRC.value or not _DST.value:
    print("error: --src and --dst are required", file=sys.stderr)
    return 2
  from calm_jax import interop
  from calm_jax.configs import ConfigError
  try:
    if _DIRECTION.value == "import":
      for w in import_reference(_SRC.value, _DST.value, _KIND.value, _AE_SRC.value, _TOKENIZER.value):
        print(f"wrote {w}")
    else:
      print(f"wrote {export_workdir(_SRC.value, _DST.value, _FORMAT.value)}")
  except (interop.InteropError, ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
