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
to a prepared directory's block length, else to config.eval.block_length
(reference: 8192 tokens for CALM, 2048 for the baseline); the value used is
written into the result.  A block longer than the model's context
(``model.backbone.max_position_embeddings``; for CALM in chunks of K tokens)
is refused.  Results are printed and written as JSON,
by default ``<workdir>/eval/<name>_<step>_<data>_T<block length>.json``
(``<name>`` is ``brier`` or ``autoencoder``, ``<step>`` ``step<N>`` or ``hf``,
``<data>`` the data's file or directory name, with the split of a prepared
directory), so that evaluations of other data or block lengths never replace
each other; a result file that exists already is refused unless --overwrite.
The autoencoder's result also goes into a PNG plot beside it.  With several
devices, BrierLM's batches are split over them (``--devices``) and sampled per
device.

Exit status: 0 done, 2 bad input (one line ``error: ...`` naming the flag,
file or checkpoint); ``--verbose`` shows INFO logs.
"""

from __future__ import annotations

import os
import re
import tempfile

from absl import flags

from calm_jax import hostmem  # stdlib-only; before anything starts threads
from launch import cli


def _define(fv: flags.FlagValues) -> None:
  d = {"flag_values": fv}
  flags.DEFINE_string("workdir", None, "Training workdir or reference HF model folder.", required=True, **d)
  flags.DEFINE_string("data", None, "Prepared data dir, or a source spec / file to prepare.", required=True,
                      **d)
  flags.DEFINE_string("split", "valid", "Split of a prepared dir (prepared-on-the-fly data: 'train').", **d)
  flags.DEFINE_integer("block_length", None, "Eval block length in tokens "
                       "(default: config.eval.block_length; reference 8192 CALM / 2048 AR).", **d)
  flags.DEFINE_integer("batch_size", 8, "Blocks per batch.", **d)
  flags.DEFINE_integer("num_blocks", 0, "Evaluate at most this many blocks (0: all).", **d)
  flags.DEFINE_enum("estimator", "both", ["lowvar", "plain", "both"], "Baseline estimator(s).", **d)
  flags.DEFINE_integer("rollout_rows", 0, "Rollout rows per block (0: from --rollout_memory_gb).", **d)
  flags.DEFINE_float("rollout_memory_gb", 2.0, "KV-cache memory budget of one rollout block.", **d)
  flags.DEFINE_integer("devices", 0, "BrierLM: split each batch over this many devices, sampling "
                       "per device (0: all devices; 1: one device, unsharded).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", **d)
  flags.DEFINE_integer("seed", 0, "PRNG seed.", **d)
  flags.DEFINE_string("output", None, "JSON output path (default: see above).", **d)
  flags.DEFINE_bool("overwrite", False, "Replace a result file that exists already.", **d)


def _check_flags(fv: flags.FlagValues) -> None:
  """Checks that need no model: they fail before JAX starts."""
  for name, low in (("batch_size", 1), ("num_blocks", 0), ("rollout_rows", 0), ("devices", 0), ("step", 0),
                    ("block_length", 1)):
    value = fv[name].value
    if value is not None and value < low:
      raise cli.UsageError(f"--{name}: must be >= {low}, got {value}")
  if not fv.rollout_memory_gb > 0:
    raise cli.UsageError(f"--rollout_memory_gb: must be > 0, got {fv.rollout_memory_gb}")
  cli.check_dir_arg("workdir", fv.workdir)
  if not fv.data.strip():
    raise cli.UsageError("--data: empty")
  if fv.output and os.path.isdir(fv.output):
    raise cli.UsageError(f"--output: {fv.output} is a directory; give a file name")


def _default_block_length(trained) -> int:
  ev = trained.config_dict.get("eval") if isinstance(trained.config_dict.get("eval"), dict) else {}
  if ev.get("block_length"):
    return int(ev["block_length"])
  return {"energy": 8192, "transformer": 2048}.get(trained.kind, 2048)


def check_context(trained, block_length: int) -> None:
  """A block must fit the model's context (else a UsageError naming --block_length)."""
  if trained.kind == "energy":
    k, limit = trained.cfg.patch_size, trained.cfg.backbone.max_position_embeddings
    if block_length // k - 1 > limit:
      raise cli.UsageError(f"--block_length: {block_length} tokens are {block_length // k} chunks of K={k}, "
                           f"beyond the model's context of {limit} input chunks "
                           f"(model.backbone.max_position_embeddings; at most {(limit + 1) * k} tokens)")
  elif trained.kind == "transformer":
    limit = trained.cfg.backbone.max_position_embeddings
    if block_length > limit:
      raise cli.UsageError(f"--block_length: {block_length} is beyond the model's context of {limit} tokens "
                           "(model.backbone.max_position_embeddings)")


def _data_tag(data_arg: str, split: str, prepared: bool) -> str:
  """A file-name-safe name of the evaluated data: its file or directory name (and split)."""
  spec = data_arg.split(";", 1)[0]
  spec = re.sub(r"^[a-z]+:", "", spec) if not os.path.exists(spec) else spec
  base = os.path.basename(os.path.normpath(spec)) or spec
  base = re.sub(r"\.(jsonl|json|txt|text|md|gz)$", "", re.sub(r"\.gz$", "", base))
  tag = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-") or "data"
  return f"{tag}-{split}" if prepared else tag


def _batches(trained, fv, block_length: int | None, tmp: str):
  """(batches, block_length, data tag): eval batches of a prepared dir, or of a source prepared into tmp."""
  from calm_jax import data  # pylint: disable=import-outside-toplevel
  data_arg, split, batch_size = fv.data, fv.split, fv.batch_size
  k = trained.cfg.patch_size if trained.kind != "transformer" else 1
  if os.path.isfile(os.path.join(data_arg, "manifest.json")):
    manifest = data.load_manifest(data_arg)
    if block_length is None:
      block_length = manifest["block_length"]
    if manifest["block_length"] != block_length:
      prepared = manifest["block_length"]
      raise data.DataError(f"--data: {data_arg} was prepared with block_length={prepared}, but "
                           f"--block_length={block_length}; prepare it again or pass a source to tokenise")
    if trained.tokenizer is not None and manifest.get("tokenizer_fingerprint") not in (
        None, trained.tokenizer.fingerprint):
      raise data.DataError(f"--data: {data_arg} was tokenised with a different tokenizer than {fv.workdir}")
    if split not in manifest.get("splits", {}):
      raise data.DataError(f"--split: {data_arg} has no split {split!r} (have {sorted(manifest['splits'])})")
    return (lambda: data.make_eval_iterator(data_arg, split, global_batch_size=batch_size)), block_length, \
        _data_tag(data_arg, split, True)
  if os.path.isdir(data_arg):
    raise data.DataError(f"--data: {data_arg} is a directory without manifest.json (not prepared data); pass "
                         "a prepared directory, a file or a source spec")
  if trained.tokenizer is None:
    raise data.DataError(f"--workdir: {fv.workdir} has no tokenizer.json to tokenise {data_arg} with; pass a "
                         "prepared directory")
  mode = "ae" if trained.kind == "autoencoder" else "lm"
  block_length = block_length or 2048
  directory = os.path.join(tmp, "data")

  def open_batches():
    try:
      data.prepare(data_arg, directory, trained.tokenizer, block_length, k, mode, valid_fraction=0.0)
      # everything goes to 'train' when nothing is held out
      return data.make_eval_iterator(directory, "train", global_batch_size=batch_size)
    except data.DataError as e:
      raise data.DataError(f"--data: {str(e).replace(directory, data_arg)}") from None
  return open_batches, block_length, _data_tag(data_arg, split, False)


def _mesh(devices: int):
  """A data-parallel mesh over ``devices`` devices, or None for one device."""
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  n = devices or jax.device_count()
  if n < 1 or n > jax.device_count():
    raise cli.UsageError(f"--devices={devices}: this machine has {jax.device_count()} devices")
  if n == 1:
    return None
  return sharding.make_mesh(data=n, fsdp=1, tensor=1, devices=jax.devices()[:n])


def main(argv: list[str] | None = None) -> None:
  """``python -m launch.evaluate``; exit status 0, or 2 with one line naming the bad input."""
  fv = cli.parse(_define, argv, __doc__, "launch.evaluate")
  with cli.errors():
    _check_flags(fv)
  import jax  # pylint: disable=import-outside-toplevel

  from calm_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from calm_jax import loading  # pylint: disable=import-outside-toplevel
  from calm_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from calm_jax.evaluation import evaluate, plots  # pylint: disable=import-outside-toplevel

  with cli.errors(loading.LoadError, DataError, ValueError):
    trained = loading.load_trained(fv.workdir, fv.step)
    block_length = fv.block_length
    if block_length is None and os.path.isfile(os.path.join(fv.data, "manifest.json")):
      block_length = data_lib.load_manifest(fv.data)["block_length"]   # prepared data: its own length
    if trained.kind != "autoencoder":   # the autoencoder is context-free: any prepared block length
      block_length = block_length or _default_block_length(trained)
      check_context(trained, block_length)
      try:
        evaluate.check_block_length(trained.kind, trained.cfg, block_length)
      except ValueError as e:
        raise cli.UsageError(f"--block_length: {e}") from None
    step = trained.config_dict.get("_step")
    tag = f"step{step}" if step is not None else "hf"
    num_batches = -(-fv.num_blocks // fv.batch_size) if fv.num_blocks else None
    key = jax.random.key(fv.seed)
    with tempfile.TemporaryDirectory() as tmp:
      open_batches, block_length, data_tag = _batches(trained, fv, block_length, tmp)
      name = "autoencoder" if trained.kind == "autoencoder" else "brier"
      out = fv.output or os.path.join(fv.workdir, "eval", f"{name}_{tag}_{data_tag}_T{block_length}.json")
      if os.path.exists(out) and not fv.overwrite:
        raise cli.UsageError(f"--output: {out} exists (an earlier result); pass --overwrite to replace it or "
                             "--output=<another file>")
      mesh = _mesh(fv.devices) if trained.kind != "autoencoder" else None
      batches = open_batches()
      if trained.kind == "autoencoder":
        pad_id = trained.tokenizer.pad_id if trained.tokenizer is not None else -1
        result = evaluate.evaluate_autoencoder(trained.cfg, trained.params, batches, key, pad_id=pad_id,
                                               num_batches=num_batches)
        print(evaluate.format_autoencoder(result))
        print("plot:", plots.plot_ae_robustness(result, os.path.splitext(out)[0] + ".png"))
      else:
        settings = evaluate.BrierSettings(fv.estimator, fv.rollout_rows, fv.rollout_memory_gb)
        result = evaluate.evaluate_brier(trained.kind, trained.cfg, trained.params, batches, key,
                                         ae_cfg=trained.ae_cfg, ae_params=trained.ae_params,
                                         settings=settings, num_batches=num_batches, mesh=mesh)
        print(evaluate.format_brier(result))
    result.update(workdir=os.path.abspath(fv.workdir), data=fv.data, step=step, seed=fv.seed)
    print("wrote", evaluate.write_json(out, result))


if __name__ == "__main__":
  hostmem.reexec_with_tuned_malloc()
  main()
