"""BrierLM (CALM, baseline) or reconstruction accuracy (autoencoder) of a trained model.

  # CALM on WikiText-103 documents, 8192-token blocks as the reference's train_calm.py.
  python -m launch.evaluate --workdir=/runs/calm_m \\
      --data=/calm/data/wikitext_document_level-test.json --block_length=8192

  # The baseline on a prepared split, both estimators.
  python -m launch.evaluate --workdir=/runs/ar_m --data=/data/pile_lm_2048 --split=valid --estimator=both

  # A converted / reference Hugging Face folder works as --workdir too.

--data is a prepared directory (``manifest.json``; --split picks the split) or a
source spec / text / JSON-lines file, which is tokenised with the model's own
tokenizer into a temporary prepared directory first.  --block_length defaults
to config.eval.block_length (reference: 8192 tokens for CALM, 2048 for the
baseline); the value used is written into the result.  Results are printed and
written as JSON (default ``<workdir>/eval/<name>_step<step>.json``); the
autoencoder's also as a PNG plot.  With several devices, BrierLM's batches are
split over them (``--devices``) and sampled per device.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir or reference HF model folder.", required=True)
_DATA = flags.DEFINE_string("data", None, "Prepared data dir, or a source spec / file to prepare.",
                            required=True)
_SPLIT = flags.DEFINE_string("split", "valid", "Split of a prepared dir (prepared-on-the-fly data: 'train').")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", None, "Eval block length in tokens "
                                     "(default: config.eval.block_length; reference 8192 CALM / 2048 AR).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Blocks per batch.")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 0, "Evaluate at most this many blocks (0: all).")
_ESTIMATOR = flags.DEFINE_enum("estimator", "both", ["lowvar", "plain", "both"], "Baseline estimator(s).")
_ROLLOUT_ROWS = flags.DEFINE_integer("rollout_rows", 0, "Rollout rows per block (0: from --rollout_memory_gb).")
_ROLLOUT_GB = flags.DEFINE_float("rollout_memory_gb", 2.0, "KV-cache memory budget of one rollout block.")
_DEVICES = flags.DEFINE_integer("devices", 0, "BrierLM: split each batch over this many devices, sampling "
                                "per device (0: all devices; 1: one device, unsharded).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path.")


def _default_block_length(trained) -> int:
  ev = trained.config_dict.get("eval") if isinstance(trained.config_dict.get("eval"), dict) else {}
  if ev.get("block_length"):
    return int(ev["block_length"])
  return {"energy": 8192, "transformer": 2048}.get(trained.kind, 2048)


def _batches(trained, data_arg: str, split: str, block_length: int, batch_size: int, tmp: str):
  from calm_jax import data  # pylint: disable=import-outside-toplevel
  k = trained.cfg.patch_size if trained.kind != "transformer" else 1
  if os.path.isfile(os.path.join(data_arg, "manifest.json")):
    manifest = data.load_manifest(data_arg)
    if block_length is None:
      block_length = manifest["block_length"]
    if manifest["block_length"] != block_length:
      raise data.DataError(f"{data_arg}: prepared with block_length={manifest['block_length']}, but "
                           f"--block_length={block_length}; prepare it again or pass a source to tokenise")
    if trained.tokenizer is not None and manifest.get("tokenizer_fingerprint") not in (
        None, trained.tokenizer.fingerprint):
      raise data.DataError(f"{data_arg}: tokenised with a different tokenizer than {_WORKDIR.value}")
    directory = data_arg
  else:
    if trained.tokenizer is None:
      raise data.DataError(f"{_WORKDIR.value}: no tokenizer.json to tokenise {data_arg} with; pass a "
                           "prepared directory")
    mode = "ae" if trained.kind == "autoencoder" else "lm"
    block_length = block_length or 2048
    directory = os.path.join(tmp, "data")
    data.prepare(data_arg, directory, trained.tokenizer, block_length, k, mode, valid_fraction=0.0)
    split = "train"  # everything goes to 'train' when nothing is held out
  return data.make_eval_iterator(directory, split, global_batch_size=batch_size)


def _mesh():
  """A data-parallel mesh over --devices devices, or None for one device."""
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  n = _DEVICES.value or jax.device_count()
  if n < 1 or n > jax.device_count():
    raise ValueError(f"--devices={_DEVICES.value}: this machine has {jax.device_count()} devices")
  if n == 1:
    return None
  return sharding.make_mesh(data=n, fsdp=1, tensor=1, devices=jax.devices()[:n])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from calm_jax.evaluation import evaluate, plots  # pylint: disable=import-outside-toplevel

  try:
    trained = loading.load_trained(_WORKDIR.value, _STEP.value)
    block_length = _BLOCK_LENGTH.value
    if trained.kind != "autoencoder":   # the autoencoder is context-free: any prepared block length
      block_length = block_length or _default_block_length(trained)
    step = trained.config_dict.get("_step")
    tag = f"step{step}" if step is not None else "hf"
    num_batches = -(-_NUM_BLOCKS.value // _BATCH_SIZE.value) if _NUM_BLOCKS.value else None
    key = jax.random.key(_SEED.value)
    with tempfile.TemporaryDirectory() as tmp:
      batches = _batches(trained, _DATA.value, _SPLIT.value, block_length, _BATCH_SIZE.value, tmp)
      if trained.kind == "autoencoder":
        pad_id = trained.tokenizer.pad_id if trained.tokenizer is not None else -1
        result = evaluate.evaluate_autoencoder(trained.cfg, trained.params, batches, key, pad_id=pad_id,
                                               num_batches=num_batches)
        print(evaluate.format_autoencoder(result))
        out = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", f"autoencoder_{tag}.json")
        print("plot:", plots.plot_ae_robustness(result, os.path.splitext(out)[0] + ".png"))
      else:
        settings = evaluate.BrierSettings(_ESTIMATOR.value, _ROLLOUT_ROWS.value, _ROLLOUT_GB.value)
        evaluate.check_block_length(trained.kind, trained.cfg, block_length)
        result = evaluate.evaluate_brier(trained.kind, trained.cfg, trained.params, batches, key,
                                         ae_cfg=trained.ae_cfg, ae_params=trained.ae_params, settings=settings,
                                         num_batches=num_batches, mesh=_mesh())
        print(evaluate.format_brier(result))
        out = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", f"brier_{tag}.json")
    result.update(workdir=os.path.abspath(_WORKDIR.value), data=_DATA.value, step=step, seed=_SEED.value)
    print("wrote", evaluate.write_json(out, result))
  except (loading.LoadError, DataError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  app.run(main)
