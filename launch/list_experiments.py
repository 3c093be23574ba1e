"""Lists every registered experiment with its parameter count (shapes only, nothing allocated).

  python -m launch.list_experiments
"""

from __future__ import annotations

from absl import app

from calm_jax import models
from calm_jax.training import train
from experiments import registry


def describe(name: str) -> str:
  exp = train.resolve(registry.get_config(name), check_paths=False)
  n = models.count_params(models.abstract_params(exp.model))
  extra = ""
  if exp.kind == "energy":
    ae = models.count_params(models.abstract_params(exp.ae_model))
    extra = f"  (+{ae / 1e6:.1f}M frozen autoencoder)"
  return f"{name:18s} {exp.kind:12s} {n / 1e6:10.2f}M{extra}   --config={registry.spec(name)}"


def main(argv):
  del argv
  for name in registry.EXPERIMENTS:
    print(describe(name), flush=True)
  for name in registry.sweeps():
    print(f"{name:18s} {'sweep':12s} {'':>11s}   {registry.spec(name)}")


if __name__ == "__main__":
  app.run(main)
