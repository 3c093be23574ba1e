"""Tests for calm_jax.data's grain iterators, the TFDS source and the prepare CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from calm_jax import data
from calm_jax.data import sources
from calm_jax.data.errors import DataError

NUM_BLOCKS, T, K = 37, 8, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _word_tokenizer(directory, n=1000):
  """A WordLevel tokenizer over words w0..w{n-1} with <eos> = id 0 (PAD gets id n)."""
  vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, n)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": "<eos>"}, f)
  return data.load_tokenizer(directory)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """NUM_BLOCKS blocks, block i filled with ids 10*i+1 .. 10*i+T, so every block is unique."""
  root = tmp_path_factory.mktemp("prep")
  tok = _word_tokenizer(str(root))
  docs = [np.arange(10 * i + 1, 10 * i + 1 + T, dtype=np.int32) for i in range(NUM_BLOCKS)]
  out = str(root / "blocks")
  manifest = data.prepare(sources.ListSource(docs), out, tok, T, K, "lm", append_eos=False,
                          valid_source_spec=sources.ListSource(docs), blocks_per_shard=10,
                          progress=False)
  assert manifest["splits"]["train"]["blocks"] == NUM_BLOCKS
  return out, manifest, tok


def _take(it, n):
  return [next(it)["tokens"].copy() for _ in range(n)]


def test_train_batches_shape_and_epoch_coverage(prepared):
  out, _, _ = prepared
  it = data.make_train_iterator(out, "train", global_batch_size=4, seed=3, process_index=0, process_count=1)
  batches = _take(it, 20)
  assert all(b.shape == (4, T) and b.dtype == np.int32 for b in batches)
  rows = np.concatenate(batches)
  # The first epoch (the first 37 rows) is a permutation of all blocks.
  first_ids = sorted(int(r[0]) // 10 for r in rows[:NUM_BLOCKS])
  assert first_ids == list(range(NUM_BLOCKS))
  assert [int(r[0]) // 10 for r in rows[:NUM_BLOCKS]] != list(range(NUM_BLOCKS))  # Shuffled.
  # The next epoch is reshuffled differently.
  assert [int(r[0]) for r in rows[NUM_BLOCKS:2 * NUM_BLOCKS]] != [int(r[0]) for r in rows[:NUM_BLOCKS]]
  other_seed = data.make_train_iterator(out, "train", 4, seed=4, process_index=0, process_count=1)
  assert not all(np.array_equal(a, b) for a, b in zip(batches, _take(other_seed, 5)))


def test_resume_reads_exactly_what_an_uninterrupted_run_reads(prepared):
  out, _, _ = prepared
  make = lambda: data.make_train_iterator(out, "train", 4, seed=7, process_index=1, process_count=2)
  uninterrupted = _take(make(), 25)  # 25 * 2 rows crosses two epoch boundaries of this host.
  it = make()
  _take(it, 11)
  state = json.loads(json.dumps(it.get_state()))  # As orbax would store it.
  _take(it, 3)  # Reads past the checkpoint (and fills the prefetch buffer) before "preemption".
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(uninterrupted[11:], _take(resumed, 14)):
    np.testing.assert_array_equal(a, b)


def test_process_slices_are_disjoint_and_cover_the_global_batch(prepared):
  out, _, _ = prepared
  steps, global_batch = 9, 8  # 72 rows: the first epoch (37 blocks) and part of the next.
  single = _take(data.make_train_iterator(out, "train", global_batch, 5, process_index=0, process_count=1),
                 steps)
  hosts = [_take(data.make_train_iterator(out, "train", global_batch, 5, process_index=p, process_count=2),
                 steps) for p in range(2)]
  for step in range(steps):
    h0, h1 = hosts[0][step], hosts[1][step]
    assert h0.shape == h1.shape == (global_batch // 2, T)
    # Host p takes global rows p, p+2, ...: together exactly the single-host global batch.
    np.testing.assert_array_equal(h0, single[step][0::2])
    np.testing.assert_array_equal(h1, single[step][1::2])
  first_epoch = np.concatenate([np.concatenate([h0, h1]) for h0, h1 in zip(*hosts)])[:32]
  ids = [int(r[0]) // 10 for r in first_epoch]
  assert len(set(ids)) == len(ids)  # No block twice within an epoch.
  with pytest.raises(DataError, match="global_batch_size 7 is not a positive multiple of process_count 2"):
    data.make_train_iterator(out, "train", 7, 0, process_index=0, process_count=2)


def test_eval_iterator_pads_or_drops_the_tail_the_same_on_every_host(prepared):
  out, manifest, tok = prepared
  for drop, n_batches in ((False, 5), (True, 4)):
    assert data.num_eval_batches(NUM_BLOCKS, 8, drop) == n_batches
    per_host = [list(data.make_eval_iterator(out, "valid", 8, process_index=p, process_count=2,
                                             drop_remainder=drop)) for p in range(2)]
    assert [len(b) for b in per_host] == [n_batches, n_batches]
    rows, mask = [], []
    for b0, b1 in zip(*per_host):
      assert b0["tokens"].shape == (4, T) and b0["row_mask"].dtype == bool
      for r in range(4):  # Undo the [p::2] interleave to get global order.
        rows += [b0["tokens"][r], b1["tokens"][r]]
        mask += [b0["row_mask"][r], b1["row_mask"][r]]
    rows = np.stack(rows)
    real = NUM_BLOCKS if not drop else 32
    assert sum(mask) == real and not any(mask[real:])
    # File order, no shuffle; padding rows are all PAD.
    np.testing.assert_array_equal(rows[:real, 0], 10 * np.arange(real) + 1)
    assert (rows[real:] == tok.pad_id).all() and manifest["pad_id"] == tok.pad_id


def test_iterators_check_the_manifest_first(prepared, tmp_path):
  out, _, tok = prepared
  it = data.make_train_iterator(out, "train", 2, 0, 0, 1, expect={
      "block_length": T, "patch_size": K, "vocab_size": tok.vocab_size,
      "tokenizer_fingerprint": tok.fingerprint})
  assert next(it)["tokens"].shape == (2, T)
  with pytest.raises(DataError, match="manifest field 'patch_size' is 4, expected 8"):
    data.make_train_iterator(out, "train", 2, 0, 0, 1, expect={"patch_size": 8})
  with pytest.raises(DataError, match="no split 'test'"):
    data.make_eval_iterator(out, "test", 2, 0, 1)
  with pytest.raises(DataError, match="no manifest"):
    data.make_train_iterator(str(tmp_path), "train", 2, 0, 0, 1)


def test_pretokenised_ids_outside_the_vocabulary_are_an_error(prepared, tmp_path):
  _, _, tok = prepared
  msg = r"bad ids: a pre-tokenised document has ids in \[1, 5000\], outside the vocabulary \[0, 1001\)"
  with pytest.raises(DataError, match=msg):
    data.prepare(sources.ListSource([np.array([1, 5000], np.int32)], "bad ids"), str(tmp_path / "x"), tok,
                 8, 4, "lm", progress=False)
  assert not os.listdir(tmp_path)  # Nothing half-written left behind.


def test_tfds_source_through_data_source(tmp_path, prepared):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCalmText(tfds.core.GeneratorBasedBuilder):
    """A two-split text data set written in ArrayRecord format, without TensorFlow."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"w{i + 1} w{i + 2} w{i + 3}"}

  TinyCalmText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = data.open_source(f"tfds:tiny_calm_text;split=train;data_dir={tmp_path}")
  docs = list(src.documents())
  assert src.num_documents == 6 and sorted(docs) == sorted(f"w{i + 1} w{i + 2} w{i + 3}" for i in range(6))
  with pytest.raises(DataError, match="tfds:.*no_such_set"):
    data.open_source(f"tfds:no_such_set;data_dir={tmp_path}")
  _, _, tok = prepared
  manifest = data.prepare(f"tfds:tiny_calm_text;split=train;data_dir={tmp_path}", str(tmp_path / "o"), tok,
                          4, 4, "ae", valid_source_spec=f"tfds:tiny_calm_text;split=test;data_dir={tmp_path}",
                          progress=False)
  # Each 3-word document + EOS is exactly one K=4 patch, so no padding and no tail.
  assert manifest["splits"]["train"]["blocks"] == 6 and manifest["splits"]["train"]["pad_tokens"] == 0
  assert manifest["splits"]["valid"]["blocks"] == 2


def test_prepare_cli(tmp_path, prepared):
  _, _, tok = prepared
  tok_dir = os.path.dirname(tok.name)
  lines = (json.dumps({"text": f"w{i} w{i + 1}"}) + "\n" for i in range(1, 99))
  (tmp_path / "in.jsonl").write_text("".join(lines))
  cmd = [sys.executable, "-m", "launch.prepare", f"--source={tmp_path}/in.jsonl", f"--tokenizer={tok_dir}",
         f"--out_dir={tmp_path}/out", "--mode=ae", "--block_length=8", "--patch_size=4",
         "--valid_fraction=0.1"]
  done = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  manifest = data.load_manifest(str(tmp_path / "out"))
  counts = manifest["splits"]
  assert counts["train"]["documents"] + counts["valid"]["documents"] == 98
  # 2 words + EOS padded to 4: two documents per 8-token block.
  assert counts["train"]["blocks"] == counts["train"]["documents"] // 2
  bad = subprocess.run(cmd[:3] + [f"--source={tmp_path}/missing.jsonl"] + cmd[4:] + ["--overwrite"],
                       check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2   # bad input (launch/cli.py)
  assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/missing.jsonl: no such file"
