"""CALM's generative heads: one interface (:mod:`calm_jax.models.heads.base`), one table.

  config ``head``   module                                  the reference's class
  ``energy``        :mod:`calm_jax.models.heads.energy`     ``EnergyTransformer`` (``MLPGenerator``)
  ``diffusion``     :mod:`calm_jax.models.heads.diffusion`  ``DiffusionTransformer`` (``DiffLoss``)
  ``flow``          :mod:`calm_jax.models.heads.flow`       ``FlowTransformer`` (``FlowLoss``)

The diffusion and flow heads share their network, :mod:`calm_jax.models.heads.adaln_mlp`.
Adding a head: its module (a :class:`~calm_jax.models.heads.base.GenerativeHead`), a row
in :data:`HEADS` and its name in :data:`calm_jax.configs.HEAD_NAMES` (plus any fields it reads).
"""

from __future__ import annotations

from calm_jax.configs import HEAD_NAMES, EnergyConfig
from calm_jax.models.heads.base import GenerativeHead
from calm_jax.models.heads.diffusion import Diffusion
from calm_jax.models.heads.energy import Energy
from calm_jax.models.heads.flow import Flow

HEADS: dict[str, type[GenerativeHead]] = {"energy": Energy, "diffusion": Diffusion, "flow": Flow}
assert tuple(HEADS) == HEAD_NAMES, (tuple(HEADS), HEAD_NAMES)


def get(cfg: EnergyConfig, **options) -> GenerativeHead:
  """The head named by ``cfg.head``, bound to ``cfg`` (``options``: head-specific, e.g. energy's
  ``pairwise``)."""
  if cfg.head not in HEADS:
    raise ValueError(f"model.head={cfg.head!r}: unknown generative head (known: {', '.join(HEADS)})")
  return HEADS[cfg.head](cfg, **options)
