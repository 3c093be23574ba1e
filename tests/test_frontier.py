"""The frontier plot from synthetic finished runs built from the tiny sweep's own configs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from calm_jax.configs import AutoencoderConfig, EnergyConfig
from calm_jax.cost import flops
from calm_jax.evaluation import frontier
from experiments import frontier as sweep


def _write_run(root, name, config, steps, brier=None, loss=None, eval_json=False, brier_n=None):
  d = os.path.join(root, name)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  rows = [{"step": s, "train/loss": 1.0} for s in range(10, steps + 1, 10)]
  if loss is not None:
    rows.append({"step": steps, "eval/loss": loss})
  if brier is not None and not eval_json:
    rows.append({"step": steps, "eval/brierlm": brier,
                 **({f"eval/brier{n + 1}": b for n, b in enumerate(brier_n)} if brier_n else {})})
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  if brier is not None and eval_json:
    with open(os.path.join(d, "eval_brier.json"), "w") as f:
      json.dump({"brierlm": brier, "brier1": 0.5,
                 **({f"brier{n + 1}": b for n, b in enumerate(brier_n)} if brier_n else {})}, f)
  return d


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("frontier"))
  for i, (name, config) in enumerate(sweep.get_sweep(root)):
    steps = config.train.steps
    _write_run(root, name, config, steps, brier=None if name.startswith("ae_") else 0.1 + 0.01 * i,
               loss=2.0, eval_json=name == "calm_tiny_k2")
  return root


def test_sweep_shape(sweep_root):
  names = [n for n, _ in sweep.get_sweep(sweep_root)]
  assert [n for n in names if n.startswith("calm")] == ["calm_tiny_k1", "calm_tiny_k2", "calm_tiny_k4"]
  assert len([n for n in names if n.startswith("transformer")]) >= 2
  for name, c in sweep.get_sweep(sweep_root):
    if c.kind == "energy":   # its autoencoder is an earlier run of the sweep with the same K
      assert names.index(os.path.basename(c.ae_workdir)) < names.index(name)
      assert c.eval.brier


def test_runs_flops_and_metric(sweep_root):
  runs = frontier.load_runs(frontier.find_workdirs(sweep_root))
  assert len(runs) == 6 and all(r.metric == "brierlm" for r in runs)   # AE workdirs skipped
  by = {r.name: r for r in runs}
  assert by["calm_tiny_k2"].value == pytest.approx(0.1 + 0.01 * 4)      # read from the eval JSON
  c = json.load(open(os.path.join(sweep_root, "calm_tiny_k4", "config.json")))
  cfg = EnergyConfig.from_dict(c["model"])
  ae = json.load(open(os.path.join(sweep_root, "ae_tiny_k4", "config.json")))
  ae_cfg = AutoencoderConfig.from_dict(ae["model"])
  tokens = c["train"]["steps"] * c["train"]["global_batch_size"] * c["data"]["block_length"]
  ae_tokens = ae["train"]["steps"] * ae["train"]["global_batch_size"] * ae["data"]["block_length"]
  want = (tokens * flops.train_flops_per_token("energy", cfg, ae_cfg, c["data"]["block_length"] // 4)
          + ae_tokens * flops.autoencoder_flops(ae_cfg, train=True).total)
  assert by["calm_tiny_k4"].train_flops == pytest.approx(want)
  # Same tokens, smaller K: more backbone work per token.
  assert by["calm_tiny_k1"].train_flops > by["calm_tiny_k2"].train_flops > by["calm_tiny_k4"].train_flops
  s = frontier.series(runs)
  assert set(s) == {"CALM (K=1)", "CALM (K=2)", "CALM (K=4)", "Transformer"}
  flops_tf = [r.train_flops for r in s["Transformer"]]
  assert flops_tf == sorted(flops_tf) and len(flops_tf) == 3


def test_plot_png_and_svg(sweep_root, tmp_path):
  runs = frontier.load_runs(frontier.find_workdirs(sweep_root))
  png, svg = frontier.plot(runs, str(tmp_path / "fig"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(svg).read()
  assert "<svg" in text and "BrierLM" in text and "K=4" in text


def test_loss_fallback_is_labelled(tmp_path):
  _, c = [x for x in sweep.get_sweep(str(tmp_path)) if x[0] == "transformer_tiny_w64"][0]
  d = _write_run(str(tmp_path), "tf", c, 20, loss=3.5)
  (r,) = frontier.load_runs([d])
  assert (r.metric, r.value) == ("eval/loss", 3.5)
  svg = frontier.plot([r], str(tmp_path / "loss"))[1]
  assert "eval loss" in open(svg).read()


def test_bad_workdir_names_the_file(tmp_path):
  with pytest.raises(frontier.FrontierError, match="config.json"):
    frontier.load_run(str(tmp_path))
  _, c = [x for x in sweep.get_sweep(str(tmp_path)) if x[0] == "transformer_tiny_w64"][0]
  d = _write_run(str(tmp_path), "tf", c, 20)
  with pytest.raises(frontier.FrontierError, match="no BrierLM"):
    frontier.load_run(d)


def test_at_chance_runs_score_zero_and_are_drawn_as_such(tmp_path):
  """Runs recorded with the reference's formula (four negative Brier-n -> 100, even number of
  negatives -> > 0) read as 0 and at chance, from metrics.jsonl, an eval JSON and a runs JSON;
  the plot labels them; a run that learned keeps its score."""
  got = {x[0]: x[1] for x in sweep.get_sweep(str(tmp_path))}
  collapsed = (-1.0, -1.0, -1.0, -1.0)              # reference formula: 100
  mixed = (0.2, 0.05, -0.01, -0.02)                 # reference formula: > 0
  learned = (0.4, 0.2, 0.1, 0.05)
  dirs = [_write_run(str(tmp_path), "calm_collapsed", got["calm_tiny_k4"], 20, brier=100.0, brier_n=collapsed),
          _write_run(str(tmp_path), "calm_mixed", got["calm_tiny_k2"], 20, brier=7.0, brier_n=mixed,
                     eval_json=True),
          _write_run(str(tmp_path), "tf_learned", got["transformer_tiny_w64"], 20, brier=99.0, brier_n=learned)]
  runs = {r.name: r for r in frontier.load_runs(dirs)}
  for name in ("calm_collapsed", "calm_mixed"):
    assert runs[name].value == 0.0 and runs[name].at_chance, name
  assert runs["calm_collapsed"].brierlm_reference == pytest.approx(100.0)
  assert runs["tf_learned"].value == pytest.approx(100 * np.prod(learned) ** 0.25)   # recomputed, not 99
  assert runs["tf_learned"].at_chance is False
  table = frontier.format_runs(list(runs.values()))
  assert table.count("at chance") == 2 and "brierlm=0.0000" in table
  # The runs JSON round trip, and a hand-edited record that still carries the clipped-product score.
  path = frontier.save_runs(list(runs.values()), str(tmp_path / "runs.json"))
  again = {r.name: r for r in frontier.load_runs_json(path)}
  assert again == runs
  rec = json.loads(Path(path).read_text())
  for d in rec:
    d["value"], d["at_chance"] = 100.0, False
  Path(path).write_text(json.dumps(rec))
  assert {r.name: (r.value, r.at_chance) for r in frontier.load_runs_json(path)}["calm_collapsed"] == (0.0, True)
  svg = Path(frontier.plot(list(runs.values()), str(tmp_path / "chance"))[1]).read_text()
  assert "at chance: a Brier-n" in svg and "calm_collapsed (at chance)" in svg and "tf_learned (at chance)" not in svg
  with pytest.raises(frontier.FrontierError, match="unknown fields"):
    Path(path).write_text(json.dumps([{"bogus": 1}]))
    frontier.load_runs_json(path)
