"""Tests for calm_jax.training.metrics: JSON lines, TensorBoard, deferred fetching, NaN detection."""

import dataclasses
import io
import json
import os

import jax.numpy as jnp
import ml_collections
import pytest

from calm_jax.training import metrics


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    w.write(
      1,
      {
        "train/loss": jnp.float32(2.5),
        "perf/tokens_per_sec": 1000.0,
        "train/lr": jnp.asarray(3e-4, jnp.bfloat16),
        "train/count": jnp.int32(7),
      },
    )
    w.write(2, {"train/loss": 2.0, "eval/hist": jnp.arange(3.0)})
  with metrics.MetricWriter(tmp_path, tensorboard=False) as w:  # a resumed run appends
    w.write(3, {"train/loss": 1.5})
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [1, 2, 3]
  assert lines[0]["train/loss"] == 2.5 and lines[0]["perf/tokens_per_sec"] == 1000.0
  assert lines[0]["train/lr"] == pytest.approx(3e-4, rel=1e-2) and lines[0]["train/count"] == 7
  assert lines[1]["eval/hist"] == [0.0, 1.0, 2.0]
  events = os.listdir(tmp_path / "tb")
  assert events and all(f.startswith("events.out.tfevents") for f in events)
  assert os.path.getsize(tmp_path / "tb" / events[0]) > 100  # flushed on close


def test_save_config_json(tmp_path):
  @dataclasses.dataclass
  class Opt:
    lr: float = 3e-4

  cfg = ml_collections.ConfigDict({"model": {"d": 8, "dtype": jnp.bfloat16}, "seed": 0})
  path = metrics.save_config_json(tmp_path / "run", cfg)
  with open(path) as f:
    saved = json.load(f)
  assert saved["model"]["d"] == 8 and saved["seed"] == 0 and "bfloat16" in saved["model"]["dtype"]
  with open(metrics.save_config_json(tmp_path, Opt(), name="opt.json")) as f:
    assert json.load(f) == {"lr": 3e-4}


def test_deferred_metrics_one_step_late():
  d = metrics.DeferredMetrics()
  assert d.push(0, {"train/loss": jnp.float32(3.0)}) is None
  assert d.push(1, {"train/loss": jnp.float32(2.0)}) == (0, {"train/loss": 3.0})
  assert d.flush() == (1, {"train/loss": 2.0})
  assert d.flush() is None


def test_non_finite_raises_one_step_late_naming_step_and_checkpoint():
  d = metrics.DeferredMetrics()
  d.push(10, {"train/loss": jnp.float32(1.0)})
  # Step 11 is NaN: nothing is raised while it is only pushed (the device is not waited on) ...
  assert d.push(
    11, {"train/loss": jnp.float32(jnp.nan), "train/gnorm": jnp.float32(1.0)}, last_good_checkpoint=10
  ) == (10, {"train/loss": 1.0})
  # ... but fetching it, when step 12 is pushed, does.
  expected = r"step 11: train/loss=nan \(last finite checkpoint: step 10; nothing non-finite was saved\)"
  with pytest.raises(metrics.NonFiniteError, match=expected) as e:
    d.push(12, {"train/loss": jnp.float32(0.5)})
  assert e.value.step == 11 and e.value.last_good_checkpoint == 10
  d = metrics.DeferredMetrics()
  d.push(0, {"eval/vec": jnp.asarray([1.0, jnp.inf])})
  with pytest.raises(metrics.NonFiniteError, match="step 0.*no checkpoint saved yet"):
    d.flush()
  unchecked = metrics.DeferredMetrics(check_finite=False)
  unchecked.push(0, {"train/loss": jnp.float32(jnp.nan)})
  assert unchecked.flush()[0] == 0


def test_progress_bar_tokens_per_sec():
  out = io.StringIO()
  with metrics.ProgressBar(10, start_step=2, file=out, mininterval=0) as bar:
    bar.update(2, tokens=1000, loss=1.25)
    bar.update(3, tokens=1000)
    assert bar.tokens_per_sec is not None and bar.tokens_per_sec > 0
  assert "4/10" in out.getvalue() and "tok/s" in out.getvalue()


def test_progress_bar_rate_is_smoothed_over_a_window(monkeypatch):
  # Steps fetched one step late arrive in bursts; the shown rate must be tokens over the window's
  # time, not the last interval's (which would read 1000 / 0.01 = 100,000 here).
  clock = iter([0.0, 1.0, 1.01, 2.0, 2.01, 3.0, 3.01])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  with metrics.ProgressBar(10, file=io.StringIO(), mininterval=0, window=4) as bar:
    for step in range(6):
      bar.update(step, tokens=1000)
    # window of 4 intervals: from t=1.01 (2000 tokens) to t=3.01 (6000 tokens)
    assert bar.tokens_per_sec == pytest.approx(4000 / 2.0)


def test_rows_are_on_disk_at_once_and_a_resume_replaces_the_rows_past_its_step(tmp_path):
  w = metrics.MetricWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3, 4):
    w.write(step, {"train/loss": float(step)})
  # Not closed (a SIGKILL now): every row is in the file already.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
  w.sync()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')          # torn by a kill mid-write
  w._file = None                               # the killed process never closes it
  with metrics.MetricWriter(tmp_path, tensorboard=False, after_step=2) as w:   # resumed from checkpoint 2
    w.write(3, {"train/loss": 3.5})
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.5)]
  assert metrics.truncate_rows_after(str(tmp_path / "metrics.jsonl"), 3) == 0
