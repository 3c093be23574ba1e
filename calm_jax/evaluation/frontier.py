"""The quality-vs-compute frontier of finished runs (the paper's K-ablation figure, Fig. 4).

Reads training workdirs (layout (b): ``config.json``, ``metrics.jsonl``, and
optionally an evaluation JSON written by ``calm_jax.evaluation.evaluate.write_json``),
computes each run's training FLOPs from its config with :mod:`calm_jax.cost.flops`,
and plots quality against FLOPs: CALM runs joined per K, the Transformer
baselines joined as one curve, as in the paper.

Quality is BrierLM (higher is better) when every run has one: from an eval JSON
in the workdir (any ``*.json`` but ``config.json`` with a ``brierlm`` key) or
else the last ``eval/brierlm`` of ``metrics.jsonl``.  Otherwise the last
``eval/loss`` of each run, and the axis says so: CALM's energy loss and the
baseline's cross-entropy are not on one scale.

  runs = frontier.load_runs(["/runs/calm_k1", "/runs/calm_k2", "/runs/tf_s"])
  frontier.plot(runs, "/runs/frontier")        # writes frontier.png and frontier.svg
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

from calm_jax.configs import AutoencoderConfig, EnergyConfig, TransformerConfig
from calm_jax.cost import flops

KIND_LABELS = {"energy": "CALM", "transformer": "Transformer"}


class FrontierError(ValueError):
  """A workdir cannot be read as a finished run; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run: its kind, K, training cost and quality."""
  workdir: str
  name: str
  kind: str                 # energy | transformer
  patch_size: int           # K (1 for the baseline)
  params: int               # the model's parameters (CALM: without the frozen AE)
  tokens: float             # tokens trained on
  train_flops: float        # tokens x model FLOPs per token (+ the AE's training for CALM, if known)
  metric: str               # 'brierlm' | 'eval/loss'
  value: float


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FrontierError(f"{path}: missing (is this a training workdir?)") from None
  except json.JSONDecodeError as e:
    raise FrontierError(f"{path}: not valid JSON ({e})") from None


def _metrics_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise FrontierError(f"{path}:{i}: not valid JSON ({e})") from None
  return rows


def _last(rows: list[dict], key: str) -> float | None:
  vals = [r[key] for r in rows if key in r and r[key] is not None]
  return float(vals[-1]) if vals else None


def _eval_json_brier(workdir: str) -> float | None:
  for path in sorted(glob.glob(os.path.join(workdir, "*.json")) + glob.glob(os.path.join(workdir, "eval", "*.json"))):
    if os.path.basename(path) == "config.json":
      continue
    d = _read_json(path)
    if isinstance(d, dict) and "brierlm" in d:
      return float(d["brierlm"])
  return None


def _ae_config(config: dict, workdir: str) -> tuple[AutoencoderConfig | None, float]:
  """The stage-1 AE's config and its training tokens, from ``ae_workdir/config.json`` when readable."""
  ae_dir = config.get("ae_workdir") or ""
  if ae_dir and not os.path.isabs(ae_dir):
    ae_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), ae_dir)
  path = os.path.join(ae_dir, "config.json")
  if not ae_dir or not os.path.isfile(path):
    return None, 0.0
  ae = _read_json(path)
  try:
    cfg = AutoencoderConfig.from_dict(ae["model"], "model")
  except (KeyError, TypeError, ValueError) as e:
    raise FrontierError(f"{path}: no valid autoencoder config ({e})") from None
  t = ae.get("train", {})
  return cfg, float(t.get("steps", 0)) * t.get("global_batch_size", 0) * ae.get("data", {}).get("block_length", 0)


def load_run(workdir: str, *, include_ae: bool = True) -> Run:
  """Reads one workdir.  ``include_ae``: charge CALM with its autoencoder's training, as Table 1 does."""
  cpath = os.path.join(workdir, "config.json")
  config = _read_json(cpath)
  try:
    kind = config["kind"]
    block, batch = config["data"]["block_length"], config["train"]["global_batch_size"]
    model = config["model"]
  except (KeyError, TypeError) as e:
    raise FrontierError(f"{cpath}: missing field {e}") from None
  if kind not in KIND_LABELS:
    raise FrontierError(f"{cpath}: kind={kind!r} has no place on the frontier (energy or transformer runs)")
  rows = _metrics_rows(workdir)
  steps = max((int(r["step"]) for r in rows if "step" in r), default=config["train"].get("steps", 0))
  tokens = float(steps) * batch * block
  if kind == "energy":
    cfg = EnergyConfig.from_dict(model, "model")
    ae_cfg, ae_tokens = _ae_config(config, workdir)
    k = cfg.patch_size
    fpt = flops.train_flops_per_token(kind, cfg, ae_cfg or flops.default_autoencoder(cfg), block // k)
    total = tokens * fpt
    if include_ae and ae_cfg is not None:
      total += ae_tokens * flops.autoencoder_flops(ae_cfg, train=True).total
    params = flops.energy_params(cfg).total
  else:
    cfg = TransformerConfig.from_dict(model, "model")
    k = 1
    total = tokens * flops.train_flops_per_token(kind, cfg, None, block)
    params = flops.transformer_params(cfg).total
  brier = _eval_json_brier(workdir)
  if brier is None:
    brier = _last(rows, "eval/brierlm")
  if brier is not None:
    metric, value = "brierlm", brier
  else:
    loss = _last(rows, "eval/loss")
    if loss is None:
      raise FrontierError(f"{workdir}: no BrierLM (eval JSON or eval/brierlm in metrics.jsonl) and no eval/loss")
    metric, value = "eval/loss", loss
  return Run(workdir, os.path.basename(os.path.normpath(workdir)), kind, k, params, tokens, total, metric, value)


def find_workdirs(root: str) -> list[str]:
  """Every directory under ``root`` (itself included) holding a config.json and a metrics.jsonl."""
  out = []
  for dirpath, _, files in os.walk(root):
    if "config.json" in files and "metrics.jsonl" in files:
      out.append(dirpath)
  return sorted(out)


def load_runs(workdirs: Sequence[str], *, include_ae: bool = True, skip_kinds=("autoencoder",)) -> list[Run]:
  """Runs of ``workdirs`` (autoencoder workdirs are skipped: they are stage 1, not on the frontier)."""
  runs = []
  for w in workdirs:
    cfg = _read_json(os.path.join(w, "config.json"))
    if isinstance(cfg, dict) and cfg.get("kind") in skip_kinds:
      continue
    runs.append(load_run(w, include_ae=include_ae))
  if not runs:
    raise FrontierError(f"no energy or transformer runs among {list(workdirs)}")
  return runs


def series(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Curves of the figure: ``CALM (K=k)`` per K and ``Transformer``, each sorted by FLOPs."""
  out: dict[str, list[Run]] = {}
  for r in runs:
    label = f"CALM (K={r.patch_size})" if r.kind == "energy" else "Transformer"
    out.setdefault(label, []).append(r)
  return {k: sorted(v, key=lambda r: r.train_flops) for k, v in sorted(out.items())}


def plot(runs: Sequence[Run], out_prefix: str, title: str = "Quality vs training compute") -> list[str]:
  """Writes ``out_prefix.png`` and ``out_prefix.svg``; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  metrics = {r.metric for r in runs}
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  markers = {"Transformer": ("s", "black", "--")}
  cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
  for i, (label, rs) in enumerate(series(runs).items()):
    marker, color, ls = markers.get(label, ("o", cycle[i % len(cycle)], "-"))
    ax.plot([r.train_flops for r in rs], [r.value for r in rs], marker=marker, color=color, linestyle=ls,
            label=label, markersize=6)
    for r in rs:
      ax.annotate(r.name, (r.train_flops, r.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  if metrics == {"brierlm"}:
    ax.set_ylabel("BrierLM (higher is better)")
  elif metrics == {"eval/loss"}:
    ax.set_ylabel("eval loss (CALM: energy loss; Transformer: CE; not one scale)")
  else:
    ax.set_ylabel("BrierLM or eval loss (mixed: see labels)")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)   # a fixed place: "best" is slow with many annotations
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths = [f"{out_prefix}.png", f"{out_prefix}.svg"]
  for p in paths:
    fig.savefig(p, dpi=150)
  plt.close(fig)
  return paths


def format_runs(runs: Sequence[Run]) -> str:
  out = [f"{'run':<24}{'kind':<12}{'K':>3}{'params(M)':>11}{'tokens':>11}{'train FLOPs':>13}  metric"]
  for r in sorted(runs, key=lambda r: (r.kind, r.patch_size, r.train_flops)):
    out.append(f"{r.name:<24}{r.kind:<12}{r.patch_size:>3}{r.params / 1e6:>11.3f}{r.tokens:>11.3g}"
               f"{r.train_flops:>13.3e}  {r.metric}={r.value:.4f}")
  return "\n".join(out)
