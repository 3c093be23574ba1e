"""Compile (never run) the loop's train step of the three tiny trainers on 8 fake CPU devices.

  python compiled_cost.py [MESH,...] [--kinds=autoencoder,energy,transformer] [--batch=64]

For every trainer (``experiments/<kind>.py:tiny`` at global batch 64) the step
is built by ``calm_jax.training.train.jit_train_step`` -- the loop's own jit:
shardings, donation, mesh -- and compiled from abstract inputs by
``calm_jax.parallel.aot`` on a one-device mesh and on each mesh given (default
8x1x1, 1x8x1, 2x4x1, 2x2x2).  Prints ``RESULT {json}``: per trainer and mesh,
XLA's per-device FLOPs (``cost_analysis``) and memory (``memory_analysis``), and
the FLOPs' ratio to the ideal (one device's FLOPs / 8).  Run by
tests/test_sharding_cost.py.
"""

import sys
import time

from common import emit, set_cpu_devices

set_cpu_devices(8)

from calm_jax.parallel import aot  # noqa: E402

SPECS = {"autoencoder": "experiments/autoencoder.py:tiny", "energy": "experiments/calm.py:tiny",
         "transformer": "experiments/transformer.py:tiny"}
MESHES = ("8x1x1", "1x8x1", "2x4x1", "2x2x2")


def main(argv):
  meshes = [a for a in argv if not a.startswith("--")]
  meshes = meshes[0].split(",") if meshes else list(MESHES)
  opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  kinds = opts.get("kinds", ",".join(SPECS)).split(",")
  batch = int(opts.get("batch", 64))
  t0 = time.time()
  out = {}
  for kind in kinds:
    exp = aot.experiment(SPECS[kind], global_batch=batch)
    one = aot.compile_train_step(exp, aot.cpu_mesh((1, 1, 1)))
    rows = {"1x1x1": one.as_dict()}
    for name in meshes:
      shape = tuple(int(x) for x in name.split("x"))
      step = aot.compile_train_step(exp, aot.cpu_mesh(shape))
      rows[name] = dict(step.as_dict(), ratio=aot.ideal_ratio(step, one.flops))
    out[kind] = rows
    out[kind]["seconds"] = time.time() - t0
  emit(out)


if __name__ == "__main__":
  main(sys.argv[1:])
