"""The tiny CPU version of the paper's K-ablation figure (Fig. 4): a sweep of runs.

CALM at K in {1, 2, 4} (each on its own tiny autoencoder, latent 32*K) and the
Transformer baseline at three tiny widths, all on the same 256-token blocks of
the embedded corpus, with BrierLM evaluated during training so that the
frontier plots BrierLM (not the incomparable losses).

  from experiments import frontier
  for name, config in frontier.get_sweep(root="/tmp/frontier_tiny"):
    # train `config` in workdir root/name, in list order (autoencoders first)
  python -m launch.frontier --root=/tmp/frontier_tiny --out=/tmp/frontier_tiny/frontier

Contract: ``get_sweep(root)`` returns ``[(name, config)]`` in an order that can
be run one after the other; every config follows layout (a), and a CALM run's
``ae_workdir`` is ``root/ae_tiny_k<K>``, a run of the same sweep listed before it.
"""

from __future__ import annotations

import os

from experiments import autoencoder, calm, transformer

KS = (1, 2, 4)
# (layers, width, FFN) of the baselines: around the tiny CALM's width of 128.
BASELINES = {"transformer_tiny_w64": (2, 64, 128), "transformer_tiny_w128": (2, 128, 256),
             "transformer_tiny_w192": (3, 192, 384)}


def _with_brier(c):
  c.eval.brier = True
  c.eval.num_blocks = 16
  return c


def get_sweep(root: str = "/tmp/frontier_tiny"):
  """The runs of the sweep, autoencoders first (see the module docstring)."""
  runs = []
  for k in KS:
    runs.append((f"ae_tiny_k{k}", autoencoder.get_config(f"tiny,K={k}")))
  for k in KS:
    c = _with_brier(calm.get_config(f"tiny,K={k}"))
    c.ae_workdir = os.path.join(root, f"ae_tiny_k{k}")
    runs.append((f"calm_tiny_k{k}", c))
  for name, (layers, d, ff) in BASELINES.items():
    c = _with_brier(transformer.get_config("tiny"))
    c.model.backbone.update(num_hidden_layers=layers, hidden_size=d, intermediate_size=ff)
    runs.append((name, c))
  return runs
