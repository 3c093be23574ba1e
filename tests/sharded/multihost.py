"""A few training steps of a tiny transformer in one or two OS processes (jax.distributed).

  python multihost.py single DATA_DIR WORKDIR              # 1 process, 4 CPU devices
  python multihost.py multi DATA_DIR WORKDIR PORT RANK     # 2 processes x 2 CPU devices, gloo

Both build the same (1, 2, 2) mesh over 4 devices (FSDP x tensor; in ``multi``
each process holds one FSDP shard) and train the same way: the state made
directly in its shardings (``sharding.init_state_sharded``), the trainer's step
with the real AdamW chain, jitted with the state's shardings and donated.  The
batches come from the grain pipeline: each process reads its own slice of the
global batch (``data.make_train_iterator`` with this process's index) and
``sharding.put_batch`` assembles the global array
(``jax.make_array_from_process_local_data``).  Metrics go through
``metrics.MetricWriter`` on every process (only process 0 may write).  After
step 2 every process takes part in an orbax save of the state and its own grain
iterator position; at the end they restore it and redo step 3, which must give
the same loss.  Then BrierLM of the trained model on the held-out split, each
process feeding its own rows (``evaluate.evaluate_brier`` with the mesh).
Process 0 prints ``RESULT {"losses", "redo_loss", "param_sum", "brier"}``.
"""

import os
import sys

from common import emit, set_cpu_devices, tiny_configs

MODE, DATA_DIR, WORKDIR = sys.argv[1:4]
if MODE == "multi":
  set_cpu_devices(2)
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  os.environ["JAX_COORDINATOR_ADDRESS"] = f"localhost:{sys.argv[4]}"
  os.environ["JAX_NUM_PROCESSES"] = "2"
  os.environ["JAX_PROCESS_ID"] = sys.argv[5]
else:
  set_cpu_devices(4)

import jax

from calm_jax import data
from calm_jax.evaluation import evaluate
from calm_jax.parallel import sharding
from calm_jax.training import checkpoint, metrics, optim, trainers

STEPS, BATCH = 3, 8


def main():
  # What launch/train.py does first: initialise jax.distributed from the environment.
  assert sharding.initialize_distributed() == (MODE == "multi")
  assert jax.device_count() == 4 and jax.process_count() == (2 if MODE == "multi" else 1)
  _, _, cfg = tiny_configs()
  mesh = sharding.make_mesh(1, 2, 2)
  ocfg = optim.OptimConfig(learning_rate=1e-2, warmup_steps=0)
  tx = trainers.make_optimizer(ocfg)
  state, shardings = sharding.init_state_sharded(cfg, tx, jax.random.key(0), mesh)
  rep = sharding.replicated(mesh)
  step = jax.jit(trainers.make_train_step("transformer", cfg, ocfg, tx, mesh=mesh), donate_argnums=(0,),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), rep, None), out_shardings=(shardings, rep))
  key = jax.random.key(1)
  it = data.make_train_iterator(DATA_DIR, "train", BATCH, seed=0)   # this process's rows
  writer = metrics.MetricWriter(WORKDIR, tensorboard=False)
  ckpt = checkpoint.Checkpointer(os.path.join(WORKDIR, "checkpoints"), save_interval_steps=1)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(STEPS):
      if i == 2:
        ckpt.save_final(i, state, it)
      batch = next(it)
      assert batch["tokens"].shape[0] == BATCH // jax.process_count()
      state, m = step(state, sharding.put_batch(mesh, {"tokens": batch["tokens"]}), key, None)
      losses.append(float(m["train/loss"]))
      writer.write(i + 1, {"train/loss": losses[-1]})
    writer.close()
    total = jax.jit(lambda p: sum(x.sum() for x in jax.tree.leaves(p)), out_shardings=rep)
    param_sum = float(total(state["params"]))
    # Every process restores the state (onto its shards) and its own iterator position.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore(target, data_iter=it)
    ckpt.close()
    assert restored.step == 2
    _, m = step(restored.state, sharding.put_batch(mesh, {"tokens": next(it)["tokens"]}), key, None)
    redo = float(m["train/loss"])
  # BrierLM with the mesh: each process feeds its own held-out rows, samples run per device,
  # and every process gets the global result.
  brier = evaluate.evaluate_brier("transformer", cfg, state["params"], data.make_eval_iterator(DATA_DIR, "valid", 4),
                                  jax.random.key(2), progress=False, mesh=mesh)
  if jax.process_index() == 0:
    emit({"losses": losses, "redo_loss": redo, "param_sum": param_sum,
          "brier": {x: brier[x] for x in ("brier1", "brier2", "brier3", "brier4", "num_rows", "num_positions")}})


if __name__ == "__main__":
  main()
