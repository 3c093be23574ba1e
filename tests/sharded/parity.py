"""One train step of every trainer on 8 fake devices, on several meshes, vs one device;
then a checkpoint saved on (8,1,1) restored onto (2,2,2), and training continued.

  python parity.py OUT_DIR 1x1x1+,1x8x1+
  python parity.py OUT_DIR 8x1x1,2x2x2 --restore

Run by tests/test_sharding.py, two such processes side by side (XLA compiles on
one core each).  The steps are the trainers' own (``trainers.make_train_step``
with the mesh, jitted with the state's shardings and the state donated, as
``train.py`` does); the optimizer is a stage that records the step's raw
gradients in its state followed by SGD, so the gradients of the real step are
compared, not those of a copy of its loss.  On the meshes marked ``+`` a
second program runs CALM's held-out loss with 3 padding rows
(``trainers.make_eval_step``: masks must be counted over the global batch, not
per device), and ``evaluate.evaluate_brier`` with the mesh runs BrierLM's
per-device sampling for CALM (K = 4) and the baseline (one compile each: kept
to two meshes).

Writes each mesh's gradients to ``OUT_DIR/<mesh>.npz`` and prints
``RESULT {json}`` with each mesh's losses, eval sums, BrierLM sums and
parameter specs (``1x1x1`` also: the energy loss from the plain pieces).

``--restore`` (needs 8x1x1 and 2x2x2 in the list) reuses the energy step's
compiled programs on both meshes: 2 steps on A = (8,1,1), save, 2 more on A;
restore onto B = (2,2,2) (the restore target carries B's shardings) and the
same 2 steps there; ``RESULT`` gains ``restore``.
"""

import math
import os
import sys
import time

from common import emit, max_abs_diff, random_params, set_cpu_devices, tiny_configs

set_cpu_devices(8)

import jax
import jax.numpy as jnp
import numpy as np
import optax

from calm_jax.evaluation import evaluate
from calm_jax.parallel import sharded_losses, sharding
from calm_jax.training import optim, trainers

KINDS = ("autoencoder", "energy", "transformer")
B, T = 8, 16


def record_grads() -> optax.GradientTransformation:
  """Keeps the incoming updates (the step's gradients) as its state and passes them on."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def main(out_dir: str, mesh_names: list[str], restore: bool):
  t0 = time.time()
  times = {}
  ae_cfg, e_cfg, t_cfg = tiny_configs()
  cfgs = {"autoencoder": ae_cfg, "energy": e_cfg, "transformer": t_cfg}
  params = {"autoencoder": random_params(ae_cfg, 0), "energy": random_params(e_cfg, 1),
            "transformer": random_params(t_cfg, 2)}
  ocfg = optim.OptimConfig(learning_rate=1e-2)
  # Plain SGD after the recorder: AdamW's per-parameter update would double the compile time of
  # these small programs (the real AdamW chain runs sharded in tests/sharded/multihost.py).
  tx = optax.chain(record_grads(), optax.sgd(0.05))
  # Optimizer state built once on the host; each mesh only places it.
  states = {k: {"step": np.zeros((), np.int32), "params": p, "opt_state": jax.device_get(jax.jit(tx.init)(p))}
            for k, p in params.items()}
  rng = np.random.default_rng(3)
  batches = [{"tokens": rng.integers(0, 64, (B, T), dtype=np.int32)} for _ in range(4)]
  eval_batch = {"tokens": batches[0]["tokens"], "row_mask": np.arange(B) < B - 3}   # 3 padding rows
  key = jax.random.key(4)

  def programs(mesh):
    """The jitted train step of every kind on ``mesh`` and the per-mesh extras."""
    rep = sharding.replicated(mesh)
    sh = {k: sharding.state_shardings(tx, params[k], sharding.param_shardings(cfgs[k], mesh), mesh) for k in KINDS}
    ae_sh = sh["autoencoder"]["params"]   # the frozen autoencoder: the same rules table
    steps = {}
    for k in KINDS:
      fn = trainers.make_train_step(k, cfgs[k], ocfg, tx, ae_cfg=ae_cfg if k == "energy" else None, mesh=mesh)
      steps[k] = jax.jit(fn, donate_argnums=(0,), out_shardings=(sh[k], rep),
                         in_shardings=(sh[k], sharding.batch_sharding(mesh), rep, ae_sh if k == "energy" else None))
    eval_step = trainers.make_eval_step("energy", e_cfg, ae_cfg=ae_cfg, mesh=mesh)
    extras = jax.jit(lambda p, a, batch, k: {"eval": eval_step(p, batch, k, a)["energy_loss"]})
    return sh, steps, extras

  def brierlm(mesh, kind, params_, ae):
    """evaluate.evaluate_brier with the mesh: BrierLM's sampling per device, as training runs it."""
    r = evaluate.evaluate_brier(kind, cfgs[kind], params_, [eval_batch], key, ae_cfg=ae_cfg, ae_params=ae,
                                progress=False, mesh=mesh)
    return {x: r[x] for x in ("brier1", "brier2", "brier3", "brier4", "num_positions", "num_rows")}

  def place(mesh, sh, kind, state=None):
    return sharding.shard_like(states[kind] if state is None else state, sh[kind])

  def one_step(mesh, sh, steps, ae, kind, state, batch):
    new, metrics = steps[kind](state, sharding.put_batch(mesh, batch), key, ae if kind == "energy" else None)
    return new, float(metrics["train/loss"])

  def run_mesh(mesh, with_extras):
    sh, steps, extras = programs(mesh)
    ae = place(mesh, sh, "autoencoder")["params"]
    out = {}
    with jax.set_mesh(mesh):
      for k in KINDS:
        new, loss = one_step(mesh, sh, steps, ae, k, place(mesh, sh, k), batches[0])
        out[k] = {"loss": loss, "grads": jax.device_get(new["opt_state"][0])}
      if with_extras:
        ex = extras(place(mesh, sh, "energy")["params"], ae, sharding.put_batch(mesh, eval_batch), key)
        out["eval"] = [float(x) for x in ex["eval"]]
        out["brier"] = {"energy": brierlm(mesh, "energy", place(mesh, sh, "energy")["params"], ae),
                        "transformer": brierlm(mesh, "transformer", place(mesh, sh, "transformer")["params"],
                                               None)}
        if mesh.size == 1:   # and the unsharded path (no mesh) draws the same CALM samples
          out["brier"]["energy_no_mesh"] = brierlm(None, "energy", params["energy"], params["autoencoder"])
    out["specs"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(place(mesh, sh, "transformer")["params"])})
    return out, (sh, steps, ae)

  result = {"meshes": {}, "times": times}
  keep = {}
  for name in mesh_names:
    with_extras = name.endswith("+")
    name = name.rstrip("+")
    shape = tuple(int(x) for x in name.split("x"))
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])
    got, programs_ = run_mesh(mesh, with_extras)
    keep[shape] = (mesh, *programs_)
    np.savez(os.path.join(out_dir, f"{name}.npz"),
             **{f"{k}/{i}": g for k in KINDS for i, g in enumerate(jax.tree.leaves(got[k]["grads"]))})
    result["meshes"][name] = {"loss": {k: got[k]["loss"] for k in KINDS}, "param_specs": got["specs"],
                              **{x: got[x] for x in ("eval", "brier") if x in got}}
    if shape == (1, 1, 1):
      # The shard_map loss on one device == EnergyModel.__call__ + losses.energy_loss, same draws.
      with jax.set_mesh(mesh):
        ref = jax.jit(lambda p, a, t, m: sharded_losses.reference_energy_loss(e_cfg, ae_cfg, p, a, t, key, m)[0])(
            params["energy"], params["autoencoder"], eval_batch["tokens"],
            np.broadcast_to(eval_batch["row_mask"][:, None], (B, T)))
      result["energy_reference"] = float(ref)
    times[name] = time.time() - t0
  if not restore:
    emit(result)
    return

  # ----------------------------------------------------------------- restore onto another mesh
  import orbax.checkpoint as ocp

  from calm_jax.training import checkpoint  # orbax and grain: only this process pays for their import

  # On (8,1,1) every array is replicated 8 times, and orbax's replica-parallel save compiles one
  # slice program per array shape per device (~100 tiny compiles: half a minute here).  Test-only:
  # let replica 0 write whole arrays; what is written, and the restore, are unchanged.
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                          override=True)

  (mesh_a, sh_a, steps_a, ae_a), (mesh_b, sh_b, steps_b, ae_b) = keep[(8, 1, 1)], keep[(2, 2, 2)]

  def train(mesh, sh, steps, ae, state, idx):
    losses = []
    with jax.set_mesh(mesh):
      for i in idx:
        state, loss = one_step(mesh, sh, steps, ae, "energy", state, batches[i])
        losses.append(loss)
    return state, losses

  state, first = train(mesh_a, sh_a, steps_a, ae_a, place(mesh_a, sh_a, "energy"), [0, 1])
  saved = jax.device_get(state)
  with checkpoint.Checkpointer(f"{out_dir}/checkpoints", save_interval_steps=1) as ckpt:
    ckpt.save_final(2, state)
  _, cont_a = train(mesh_a, sh_a, steps_a, ae_a, state, [2, 3])
  target = sharding.abstract_state(tx, params["energy"], sh_b["energy"])
  with checkpoint.Checkpointer(f"{out_dir}/checkpoints", save_interval_steps=1) as ckpt:
    restored = ckpt.restore(target)
  shardings_match = all(x.sharding == s for x, s in zip(jax.tree.leaves(restored.state),
                                                        jax.tree.leaves(sh_b["energy"]), strict=True))
  specs_b = sorted({str(x.sharding.spec) for x in jax.tree.leaves(restored.state["params"])})
  restored_diff = max_abs_diff(jax.device_get(restored.state), saved)
  _, cont_b = train(mesh_b, sh_b, steps_b, ae_b, restored.state, [2, 3])
  times["restore"] = time.time() - t0
  result["restore"] = {"first": first, "continue_a": cont_a, "continue_b": cont_b,
                       "restored_step": restored.step, "shardings_match": shardings_match,
                       "restored_diff": restored_diff, "specs_b": specs_b}
  result["times"] = times
  emit(result)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].split(","), "--restore" in sys.argv[3:])
