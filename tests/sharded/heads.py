"""The diffusion and flow heads on 8 simulated devices against one: samples, loss and BrierLM.

  python tests/sharded/heads.py      # prints RESULT {...} (run by tests/test_heads.py)

For each head: the per-device samples of ``sharded_head_samples_fn`` (mesh 8x1x1)
against the head's unsharded ``sample`` with the same per-row noise; the
shard_map loss against ``reference_energy_loss`` (the same per-row draws, no
mesh); ``evaluate_brier`` with the mesh against without.  The energy head's
versions of these run in tests/sharded/parity.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, random_params, set_cpu_devices, tiny_configs  # noqa: E402

set_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from calm_jax.evaluation import evaluate  # noqa: E402
from calm_jax.models import heads  # noqa: E402
from calm_jax.models.calm import EnergyModel  # noqa: E402
from calm_jax.parallel import sharded_losses, sharding  # noqa: E402

B, T = 8, 16


def main():
  ae_cfg, e_cfg, _ = tiny_configs()
  ae_p = random_params(ae_cfg, 0)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 64, (B, T), dtype=np.int32)
  row_mask = np.arange(B) < B - 2
  mask_BxT = np.broadcast_to(row_mask[:, None], (B, T))
  key = jax.random.key(4)
  mesh = sharding.make_mesh(8, 1, 1, devices=jax.devices()[:8])
  out = {}
  for name in ("diffusion", "flow"):
    cfg = e_cfg.replace(head=name, diffusion_sampling_steps=3, flow_sampling_steps=2)
    p = random_params(cfg, 1)
    head = heads.get(cfg)
    h, _ = jax.jit(lambda p, t: EnergyModel(cfg).apply({"params": p}, t, method="hidden"))(p, tokens)
    s = h.shape[1]
    one = jax.jit(lambda hp, h: head.sample(hp, h[None], sharded_losses.row_noise(cfg, key, jnp.arange(B), s,
                                                                                  2)))(
        p["generative_head"], h)
    ref_loss = jax.jit(lambda p, a, t, m: sharded_losses.reference_energy_loss(cfg, ae_cfg, p, a, t, key,
                                                                               m)[0])(
        p, ae_p, tokens, mask_BxT)
    brier_one = evaluate.evaluate_brier("energy", cfg, p, [{"tokens": tokens, "row_mask": row_mask}], key,
                                        ae_cfg=ae_cfg, ae_params=ae_p, progress=False)
    with jax.set_mesh(mesh):
      placed = sharding.put_batch(mesh, {"tokens": tokens, "mask": np.asarray(mask_BxT)})
      hs = jax.device_put(h, sharding.batch_sharding(mesh, 3))
      eight = jax.jit(sharded_losses.sharded_head_samples_fn(cfg, mesh, 2))(p["generative_head"], hs, key)
      loss_fn = sharded_losses.sharded_energy_loss_fn(cfg, ae_cfg, mesh)
      loss8 = jax.jit(lambda p, a, t, m: loss_fn(p, a, t, key, m)[0])(p, ae_p, placed["tokens"],
                                                                      placed["mask"])
    brier_eight = evaluate.evaluate_brier("energy", cfg, p, [{"tokens": tokens, "row_mask": row_mask}], key,
                                          ae_cfg=ae_cfg, ae_params=ae_p, progress=False, mesh=mesh)
    one, eight = np.asarray(one), np.asarray(jax.device_get(eight))
    out[name] = {"samples_max_abs_diff": float(np.max(np.abs(one - eight))),
                 "samples_scale": float(np.max(np.abs(one))),
                 "samples_spread": float(np.std(one[0] - one[1])),
                 "loss_one": float(ref_loss), "loss_eight": float(loss8),
                 "brier_one": [brier_one[f"brier{i}"] for i in range(1, 5)],
                 "brier_eight": [brier_eight[f"brier{i}"] for i in range(1, 5)]}
  emit(out)


if __name__ == "__main__":
  main()
