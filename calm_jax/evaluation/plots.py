"""Small matplotlib figures for evaluation reports (Agg backend: no display needed).

Each function takes plain results (dicts / lists) and writes one PNG; none
imports JAX, so plots can be redrawn from saved JSON.
"""

from __future__ import annotations

import os
from typing import Any


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig, path: str) -> str:
  """Writes ``fig`` to ``path`` (directories created) and closes it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def plot_ae_robustness(result: dict[str, Any], path: str, title: str = "Autoencoder robustness") -> str:
  """Token and chunk reconstruction accuracy against latent noise sigma.

  ``result`` is ``calm_jax.evaluation.evaluate.evaluate_autoencoder``'s output; numeric
  sigmas are drawn as lines, the 'posterior' row (if any) as dashed levels.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  pairs = [(s, t, c) for s, t, c in zip(result["sigmas"], result["token_accuracy"], result["chunk_accuracy"])]
  num = [(s, t, c) for s, t, c in pairs if not isinstance(s, str)]
  xs = [p[0] for p in num]
  for idx, (label, marker, color) in enumerate((("token", "o", "C0"), ("whole chunk", "s", "C1"))):
    ax.plot(xs, [100 * p[1 + idx] for p in num], marker=marker, color=color, label=f"{label} accuracy")
    for s, t, c in pairs:
      if isinstance(s, str):
        ax.axhline(100 * (t, c)[idx], ls="--", lw=0.8, color=color, label=f"{label}, {s} sample")
  ax.set_xlabel("latent noise $\\sigma$ (z = $\\mu$ + $\\sigma\\,\\epsilon$)")
  ax.set_ylabel("reconstruction accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save(fig, path)


def plot_head_steps(curves: list[dict[str, Any]], path: str,
                    title: str = "BrierLM against sampling steps (paper Fig. 9)") -> str:
  """BrierLM (x100) against the sampler's steps, one curve per (head, solver), log x-axis.

  ``curves``: ``launch.head_steps`` results, each ``{'label', 'points': [{'steps', 'brierlm',
  'brierlm_se'}, ...]}``; a one-step head (energy) is one point, drawn as a dashed level too.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, c in enumerate(curves):
    pts = sorted(c["points"], key=lambda p: p["steps"])
    xs, ys = [p["steps"] for p in pts], [100 * p["brierlm"] for p in pts]
    err = [100 * p.get("brierlm_se", 0.0) for p in pts]
    ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, color=f"C{i}", label=c["label"])
    if len(pts) == 1:
      ax.axhline(ys[0], ls="--", lw=0.8, color=f"C{i}")
  ax.set_xscale("log")
  ax.set_xlabel("sampling steps")
  ax.set_ylabel("BrierLM")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save(fig, path)
