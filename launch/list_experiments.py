"""Lists every registered experiment with its parameter count (shapes only, nothing allocated).

  python -m launch.list_experiments

A CALM experiment's frozen autoencoder is counted as the registry's autoencoder
of the same vocabulary, K and latent size (``ae_tiny`` for ``calm_tiny``,
``ae_k4`` for ``calm_m``), the one it is meant to run on.
"""

from __future__ import annotations

import sys

from launch import cli


def _autoencoders():
  """(name, AutoencoderConfig) of every registered autoencoder experiment."""
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel
  out = []
  for name in registry.EXPERIMENTS:
    exp = train.resolve(registry.get_config(name), check_paths=False)
    if exp.kind == "autoencoder":
      out.append((name, exp.model))
  return out


def frozen_autoencoder(exp, autoencoders) -> tuple[str, object]:
  """The registered autoencoder a CALM experiment runs on (same vocabulary, K, latent), else the paper's."""
  for name, ae in autoencoders:
    if (ae.vocab_size, ae.patch_size, ae.latent_size) == (exp.vocab_size, exp.model.patch_size,
                                                           exp.model.latent_size):
      return name, ae
  return "paper-sized", exp.ae_model


def describe(name: str, autoencoders=None) -> str:
  from calm_jax import models  # pylint: disable=import-outside-toplevel
  from calm_jax.training import train  # pylint: disable=import-outside-toplevel
  from experiments import registry  # pylint: disable=import-outside-toplevel
  exp = train.resolve(registry.get_config(name), check_paths=False)
  n = models.count_params(models.abstract_params(exp.model))
  extra = ""
  if exp.kind == "energy":
    ae_name, ae_cfg = frozen_autoencoder(exp, _autoencoders() if autoencoders is None else autoencoders)
    ae = models.count_params(models.abstract_params(ae_cfg))
    extra = f"  (+{ae / 1e6:.2f}M frozen autoencoder, {ae_name})"
  return f"{name:18s} {exp.kind:12s} {n / 1e6:10.2f}M{extra}   --config={registry.spec(name)}"


def main(argv: list[str] | None = None) -> None:
  cli.parse(lambda fv: None, argv, __doc__, "launch.list_experiments")
  from experiments import registry  # pylint: disable=import-outside-toplevel
  autoencoders = _autoencoders()
  for name in registry.EXPERIMENTS:
    print(describe(name, autoencoders), flush=True)
  for name in registry.sweeps():
    print(f"{name:18s} {'sweep':12s} {'':>11s}   {registry.spec(name)}")


if __name__ == "__main__":
  main(sys.argv)
