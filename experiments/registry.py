"""Named experiments -> ``file:arg`` specs (the paper's setups and their tiny variants).

  from experiments import registry
  config = registry.get_config("calm_m")         # a locked ml_collections.ConfigDict
  registry.spec("calm_m")                         # 'experiments/calm.py:size=M'

On the command line a name's spec is what ``--config=`` takes::

  python -m launch.train --config=experiments/calm.py:size=M ...
  python -m launch.list_experiments             # every name with its parameter count

``frontier_tiny`` is a *sweep* (several runs), listed when
``experiments/frontier.py`` provides ``get_sweep()``.
"""

from __future__ import annotations

import importlib
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))

EXPERIMENTS: dict[str, str] = {
    # Stage 1, one autoencoder per K (latent 32*K).
    **{f"ae_k{k}": f"autoencoder.py:K={k}" for k in (1, 2, 4, 8)},
    "ae_tiny": "autoencoder.py:tiny",
    # Stage 2 (Table 1, K=4) and the K ablation of CALM-L (Fig. 4).
    "calm_m": "calm.py:size=M",
    "calm_l": "calm.py:size=L",
    "calm_xl": "calm.py:size=XL",
    **{f"calm_l_k{k}": f"calm.py:size=L,K={k}" for k in (1, 2, 4, 8)},
    "calm_tiny": "calm.py:tiny",
    # The generative-head ablation (§7.4, Figs. 8-9) on its base config, the reference's
    # train_{diffusion,flow}.sh (size M), and tiny variants.
    "calm_ablation": "calm.py:size=ablation",
    **{f"calm_ablation_{h}": f"calm.py:size=ablation,head={h}" for h in ("diffusion", "flow")},
    **{f"calm_m_{h}": f"calm.py:size=M,head={h}" for h in ("diffusion", "flow")},
    **{f"calm_tiny_{h}": f"calm.py:tiny,head={h}" for h in ("diffusion", "flow")},
    # Discrete baselines.
    "transformer_s": "transformer.py:size=S",
    "transformer_m": "transformer.py:size=M",
    "transformer_l": "transformer.py:size=L",
    "transformer_tiny": "transformer.py:tiny",
}

SWEEPS: dict[str, str] = {
    "frontier_tiny": "frontier.py:get_sweep()",
}


def sweeps() -> dict[str, str]:
  """The sweeps whose files exist (another module provides ``frontier.py``)."""
  return {name: s for name, s in SWEEPS.items() if os.path.isfile(os.path.join(HERE, s.split(":")[0]))}


def names() -> list[str]:
  return list(EXPERIMENTS) + list(sweeps())


def spec(name: str) -> str:
  """The ``experiments/<file>.py:<arg>`` string for ``--config=``."""
  if name in EXPERIMENTS:
    return f"experiments/{EXPERIMENTS[name]}"
  if name in sweeps():
    return f"experiments/{SWEEPS[name]}"
  raise KeyError(f"unknown experiment {name!r} (known: {', '.join(names())})")


def _module(file: str):
  return importlib.import_module(f"experiments.{file.removesuffix('.py')}")


def get_config(name: str) -> ml_collections.ConfigDict:
  """The locked config of a named (non-sweep) experiment."""
  if name not in EXPERIMENTS:
    raise KeyError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
  file, _, arg = EXPERIMENTS[name].partition(":")
  config = _module(file).get_config(arg)
  config.lock()
  return config


def get_sweep(name: str, **kwargs):
  """Whatever the sweep file's ``get_sweep(**kwargs)`` returns (its docstring gives the contract)."""
  if name not in sweeps():
    raise KeyError(f"unknown sweep {name!r} (known: {', '.join(sweeps())})")
  return _module(SWEEPS[name].split(":")[0]).get_sweep(**kwargs)
