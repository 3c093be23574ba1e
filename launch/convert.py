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

A --dst that is a file or holds anything is refused (nothing is overwritten);
so is an empty or missing --src.  Exit status: 0 done, 2 bad input (one line
``error: ...``); ``--verbose`` shows INFO logs.
"""

from __future__ import annotations

import os

from absl import flags

from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_enum("direction", "import", ["import", "export"], "import: reference -> calm_jax.", **d)
  flags.DEFINE_string("src", None, "Source folder (reference folder or calm_jax workdir).", **d)
  flags.DEFINE_string("dst", None, "Destination folder (new or empty).", **d)
  flags.DEFINE_enum("kind", "auto", ["auto", "autoencoder", "energy", "transformer"], "Model kind.", **d)
  flags.DEFINE_string("ae_src", None, "Reference autoencoder folder for an energy model.", **d)
  flags.DEFINE_string("tokenizer", None, "tokenizer.json or its folder, copied into the workdir.", **d)
  flags.DEFINE_enum("format", "safetensors", ["safetensors", "bin"], "Export weight format.", **d)


def check_destination(dst: str) -> None:
  """Refuse a destination that is a file or holds anything: a conversion never overwrites (UsageError)."""
  if os.path.exists(dst) and not os.path.isdir(dst):
    raise cli.UsageError(f"--dst: {dst} is a file; choose a new or empty directory (nothing overwritten)")
  if os.path.isdir(dst) and os.listdir(dst):
    shown = ", ".join(sorted(os.listdir(dst))[:3])
    raise cli.UsageError(f"--dst: {dst} is not empty ({shown}{', ...' if len(os.listdir(dst)) > 3 else ''}); "
                         "choose a new or empty directory (nothing overwritten)")


def _check_source(flag: str, src: str) -> None:
  cli.check_dir_arg(flag, src)
  if not os.listdir(src):
    raise cli.UsageError(f"--{flag}: {src} is empty (no config.json, no weights)")


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


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.convert``; exit status 0, or 2 with one line naming the bad input."""
  fv = cli.parse(_define, argv, __doc__, "launch.convert")
  with cli.errors():
    if not fv.src or not fv.dst:
      raise cli.UsageError(f"--{'src' if not fv.src else 'dst'}: required")
    _check_source("src", fv.src)
    if fv.ae_src:
      _check_source("ae_src", fv.ae_src)
    if os.path.abspath(fv.src) == os.path.abspath(fv.dst):
      raise cli.UsageError(f"--dst: the same directory as --src ({fv.src})")
    check_destination(fv.dst)
  from calm_jax import interop, loading  # pylint: disable=import-outside-toplevel
  from calm_jax.configs import ConfigError  # pylint: disable=import-outside-toplevel
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  with cli.errors(interop.InteropError, ConfigError, loading.LoadError, DataError, FileNotFoundError):
    if fv.tokenizer:
      from calm_jax import data  # pylint: disable=import-outside-toplevel
      try:
        data.load_tokenizer(fv.tokenizer)   # before anything is written
      except DataError as e:
        raise cli.UsageError(f"--tokenizer: {e}") from None
    if fv.direction == "import":
      for w in import_reference(fv.src, fv.dst, fv.kind, fv.ae_src, fv.tokenizer):
        print(f"wrote {w}")
    else:
      print(f"wrote {export_workdir(fv.src, fv.dst, fv.format)}")


def run():
  main()


if __name__ == "__main__":
  main()
