"""The quality-vs-compute frontier of finished runs (the paper's K-ablation figure, Fig. 4).

Reads training workdirs (layout (b): ``config.json``, ``metrics.jsonl``, and
optionally an evaluation JSON written by ``calm_jax.evaluation.evaluate.write_json``),
computes each run's training FLOPs from its config with :mod:`calm_jax.cost.flops`,
and plots quality against FLOPs: CALM runs joined per K, the Transformer
baselines joined as one curve, as in the paper.

Quality is BrierLM (higher is better) when every run has one: from an eval JSON
in the workdir (any ``*.json`` but ``config.json`` with a ``brierlm`` key) or
else the last evaluation with ``eval/brierlm`` in ``metrics.jsonl``.  Otherwise
the last ``eval/loss`` of each run, and the axis says so: CALM's energy loss and
the baseline's cross-entropy are not on one scale.

BrierLM is recomputed from the recorded Brier-1..4 whenever they are there
(``brier.brierlm``: 0 when any Brier-n <= 0), so runs recorded with the
reference's formula (which clips only the product, and scores a collapsed
sampler up to 100) are read correctly; such runs are ``at_chance`` and the plot
draws them as hollow markers on the chance line, labelled "at chance".
Runs can be saved to and redrawn from a JSON list (:func:`save_runs`,
:func:`load_runs_json`), so a figure outlives the workdirs it came from.

  runs = frontier.load_runs(["/runs/calm_k1", "/runs/calm_k2", "/runs/tf_s"])
  frontier.plot(runs, "/runs/frontier")        # writes frontier.png and frontier.svg
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import numpy as np

from calm_jax.configs import AutoencoderConfig, EnergyConfig, TransformerConfig
from calm_jax.cost import flops
from calm_jax.evaluation import brier

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
  value: float              # BrierLM (0 at chance) or the loss
  brier_n: tuple[float, ...] | None = None      # Brier-1..4 means (fractions), when recorded
  brier_n_se: tuple[float, ...] | None = None   # their standard errors, when recorded
  at_chance: bool | None = None                 # some Brier-n <= 0 (None: Brier-n not recorded)
  brierlm_reference: float | None = None        # the reference's formula, for comparison
  block_length: int | None = None               # the evaluation's block length, when recorded


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


def _eval_json_brier(workdir: str) -> dict | None:
  for path in sorted(glob.glob(os.path.join(workdir, "*.json")) + glob.glob(os.path.join(workdir, "eval", "*.json"))):
    if os.path.basename(path) == "config.json":
      continue
    d = _read_json(path)
    if isinstance(d, dict) and "brierlm" in d:
      return d
  return None


def _metrics_brier(rows: list[dict]) -> dict | None:
  """The last evaluation with ``eval/brierlm`` in metrics.jsonl, keys without the ``eval/`` prefix."""
  for r in reversed(rows):
    if r.get("eval/brierlm") is not None:
      return {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
  return None


def brier_fields(d: dict) -> dict[str, Any]:
  """Run fields from an evaluation result (``evaluate_brier``'s keys): BrierLM recomputed from Brier-1..4.

  Without all four Brier-n the recorded ``brierlm`` is taken as is and
  ``at_chance`` is what was recorded (or None: unknown).
  """
  names = [f"brier{n}" for n in range(1, brier.MAX_N + 1)]
  out: dict[str, Any] = {"block_length": int(d["block_length"]) if d.get("block_length") else None}
  if all(d.get(n) is not None for n in names):
    b = np.array([float(d[n]) for n in names])
    out.update(value=float(brier.brierlm(b)), brier_n=tuple(float(x) for x in b),
               at_chance=bool(brier.at_chance(b)), brierlm_reference=float(brier.brierlm_reference(b)))
    if all(d.get(f"{n}_se") is not None for n in names):
      out["brier_n_se"] = tuple(float(d[f"{n}_se"]) for n in names)
  else:
    out.update(value=float(d["brierlm"]), at_chance=None if d.get("at_chance") is None else bool(d["at_chance"]))
  return out


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
  found = _eval_json_brier(workdir) or _metrics_brier(rows)
  if found is not None:
    fields = {"metric": "brierlm", **brier_fields(found)}
  else:
    loss = _last(rows, "eval/loss")
    if loss is None:
      raise FrontierError(f"{workdir}: no BrierLM (eval JSON or eval/brierlm in metrics.jsonl) and no eval/loss")
    fields = {"metric": "eval/loss", "value": loss}
  return Run(workdir, os.path.basename(os.path.normpath(workdir)), kind, k, params, tokens, total, **fields)


def save_runs(runs: Sequence[Run], path: str) -> str:
  """Writes the runs as a JSON list (one object per run, :class:`Run`'s fields), so the plot can be redrawn."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump([dataclasses.asdict(r) for r in runs], f, indent=1)
    f.write("\n")
  return path


def load_runs_json(path: str) -> list[Run]:
  """Runs from :func:`save_runs`'s JSON.  Where Brier-1..4 are given, BrierLM and ``at_chance`` are
  recomputed from them (a hand-written or old record cannot carry a product-clipped score)."""
  data = _read_json(path)
  if not isinstance(data, list) or not data:
    raise FrontierError(f"{path}: expected a non-empty JSON list of runs")
  names = {f.name for f in dataclasses.fields(Run)}
  runs = []
  for i, d in enumerate(data):
    unknown = set(d) - names if isinstance(d, dict) else {"<not an object>"}
    if unknown:
      raise FrontierError(f"{path}: run {i} has unknown fields {sorted(unknown)}")
    d = dict(d)
    if d.get("metric") == "brierlm" and d.get("brier_n") is not None:
      b = np.asarray(d["brier_n"], float)
      d.update(value=float(brier.brierlm(b)), at_chance=bool(brier.at_chance(b)),
               brierlm_reference=float(brier.brierlm_reference(b)), brier_n=tuple(b.tolist()))
    if d.get("brier_n_se") is not None:
      d["brier_n_se"] = tuple(d["brier_n_se"])
    try:
      runs.append(Run(**d))
    except TypeError as e:
      raise FrontierError(f"{path}: run {i}: {e}") from None
  return runs


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
  fig, ax = plt.subplots(figsize=(8.4, 4.4))
  markers = {"Transformer": ("s", "black", "--")}
  cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
  num_chance = 0
  for i, (label, rs) in enumerate(series(runs).items()):
    marker, color, ls = markers.get(label, ("o", cycle[i % len(cycle)], "-"))
    ax.plot([r.train_flops for r in rs], [r.value for r in rs], marker=None, color=color, linestyle=ls,
            label=label)
    for r in rs:
      chance = r.metric == "brierlm" and bool(r.at_chance)
      # At chance: a hollow marker on the chance line, so it can never read as a score.
      ax.plot([r.train_flops], [r.value], marker=marker, markersize=7 if chance else 6, linestyle="none",
              color=color, markerfacecolor="white" if chance else color, markeredgewidth=1.5 if chance else 1)
      if chance:   # stacked labels: at-chance points share y = 0 and often nearly share x
        ax.annotate(f"{r.name} (at chance)", (r.train_flops, r.value), fontsize=6, color=color,
                    xytext=(3, 6 + 9 * num_chance), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5})
        num_chance += 1
      else:
        ax.annotate(r.name, (r.train_flops, r.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
  if metrics == {"brierlm"}:
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
  if num_chance:
    ax.plot([], [], marker="o", linestyle="none", color="grey", markerfacecolor="white",
            label="at chance: a Brier-n <= 0, BrierLM 0")
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
  # A fixed place ("best" is slow with many annotations), outside the axes: at-chance points sit low.
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  paths = [f"{out_prefix}.png", f"{out_prefix}.svg"]
  for p in paths:
    fig.savefig(p, dpi=150, bbox_inches="tight")
  plt.close(fig)
  return paths


def format_runs(runs: Sequence[Run]) -> str:
  out = [f"{'run':<24}{'kind':<12}{'K':>3}{'params(M)':>11}{'tokens':>11}{'train FLOPs':>13}  metric"]
  for r in sorted(runs, key=lambda r: (r.kind, r.patch_size, r.train_flops)):
    extra = ""
    if r.brier_n is not None:
      extra = "  Brier-1..4 (x100) " + " / ".join(f"{100 * b:.2f}" for b in r.brier_n)
    if r.at_chance:
      extra += f"  at chance (reference formula {r.brierlm_reference:.2f})" if r.brierlm_reference is not None \
          else "  at chance"
    if r.block_length:
      extra += f"  T={r.block_length}"
    out.append(f"{r.name:<24}{r.kind:<12}{r.patch_size:>3}{r.params / 1e6:>11.3f}{r.tokens:>11.3g}"
               f"{r.train_flops:>13.3e}  {r.metric}={r.value:.4f}{extra}")
  return "\n".join(out)
