"""Tests for calm_jax.data: tokenizers, packing, sources, prepare/manifest, default corpus.

The grain iterators, TFDS and the CLI are in test_data_pipeline.py.
"""

import gzip
import json
import os
import subprocess
import time

import numpy as np
import pytest
import tokenizers

from calm_jax import data
from calm_jax.data import blocks, corpus, sources
from calm_jax.data.errors import DataError

REFERENCE_REPO = "/work/.mirror/shaochenze+calm/repo"


@pytest.fixture(scope="module")
def small_docs():
  """Prose from the first 60 stdlib files: real English, built in well under a second."""
  return [text for _, text in corpus.build_documents(max_files=60)]


@pytest.fixture(scope="module")
def bpe(small_docs):
  return data.train_bpe_tokenizer(small_docs, 400)


def _llama_like_dir(tmp_path, with_side_files=True):
  """A tiny tokenizer.json shaped like Llama-3's: BOS added by a post-processor, no PAD."""
  vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "[UNK]": 2, "hello": 3, "world": 4, "calm": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
  tok.save(str(tmp_path / "tokenizer.json"))
  if with_side_files:
    # HF writes tokens either as strings or as AddedToken dicts; use both forms.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True}}))
  return tmp_path, len(vocab)


# ---------------------------------------------------------------- tokenizers


def test_bpe_is_deterministic_and_round_trips(small_docs, bpe):
  again = data.train_bpe_tokenizer(small_docs, 400)
  assert again.fingerprint == bpe.fingerprint
  assert (bpe.vocab_size, bpe.pad_id, bpe.eos_id, bpe.bos_id) == (400, 399, 0, None)
  texts = ["Return the number of items in a container.", "  spaces\tand\nnewlines ",
           "naïve café — ünïcödé ✓"]
  ids = bpe.encode_batch(texts)
  assert all(x.dtype == np.int32 for x in ids)
  assert [bpe.decode(x) for x in ids] == texts
  assert max(int(x.max()) for x in ids) < bpe.pad_id  # Text never encodes to PAD.
  assert bpe.decode([bpe.eos_id, bpe.pad_id]) == "<|endoftext|>[PAD]"


def test_bpe_too_small_vocab_is_an_error(small_docs):
  with pytest.raises(DataError, match="vocab_size 200"):
    data.train_bpe_tokenizer(small_docs, 200)


def test_load_tokenizer_adds_pad_last_like_the_reference(tmp_path):
  directory, n = _llama_like_dir(tmp_path)
  tok = data.load_tokenizer(str(directory))
  # As AutoTokenizer + add_special_tokens(pad_token="[PAD]"): len(tokenizer) grows by one.
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (n + 1, n, 1, 0)
  assert tok.encode("hello calm").tolist() == [0, 3, 5]  # BOS from the post-processor.
  assert tok.encode("hello", add_special_tokens=False).tolist() == [3]
  original = (directory / "tokenizer.json").read_text()
  assert tok.fingerprint != __import__("hashlib").sha256(original.encode()).hexdigest()
  # A saved tokenizer reloads with the same ids and fingerprint (no second PAD).
  reloaded = data.load_tokenizer(tok.save(str(tmp_path / "saved")))
  assert (reloaded.vocab_size, reloaded.pad_id, reloaded.fingerprint) == (tok.vocab_size, n, tok.fingerprint)


def test_load_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="nope: no such tokenizer file"):
    data.load_tokenizer(str(tmp_path / "nope"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match="bad.json"):
    data.load_tokenizer(str(bad))
  # No side files and no conventional EOS name -> ask for eos_token.
  vocab = {"[UNK]": 0, "x": 1}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  (tmp_path / "t").mkdir()
  tok.save(str(tmp_path / "t" / "tokenizer.json"))
  with pytest.raises(DataError, match="t/tokenizer.json: cannot tell which token is EOS"):
    data.load_tokenizer(str(tmp_path / "t"))
  assert data.load_tokenizer(str(tmp_path / "t"), eos_token="x").eos_id == 1


# ---------------------------------------------------------------- packing


def _docs(*lengths, start=10):
  out, next_id = [], start
  for n in lengths:
    out.append(np.arange(next_id, next_id + n, dtype=np.int32))
    next_id += n
  return out


def _pack(docs, T, K, mode, **kw):
  packer = data.BlockPacker(T, K, mode, eos_id=1, pad_id=2, **kw)
  out = [packer.add(d) for d in docs]
  return np.concatenate(out), packer.finish()


def test_ae_packing_appends_eos_and_pads_each_document_to_k():
  docs = _docs(5, 3, 8, 1, 6)
  blocks_NxT, stats = _pack(docs, 8, 4, "ae")
  # Expected stream built by hand: doc + EOS, then PAD up to a multiple of 4.
  stream = []
  for d in docs:
    piece = list(d) + [1]
    stream += piece + [2] * (-len(piece) % 4)
  assert len(stream) == 8 + 4 + 12 + 4 + 8
  np.testing.assert_array_equal(blocks_NxT.reshape(-1), stream[: blocks_NxT.size])
  assert blocks_NxT.shape == (len(stream) // 8, 8)
  assert stats.documents == 5 and stats.eos_tokens == 5
  assert stats.pad_tokens == sum(-(len(d) + 1) % 4 for d in docs)
  assert stats.dropped_tokens == len(stream) % 8
  assert stats.tokens == blocks_NxT.size == stats.blocks * 8
  # Every K-patch holds one document: PAD only after EOS, EOS only at a document end.
  for patch in blocks_NxT.reshape(-1, 4):
    if 2 in patch:
      first_pad = list(patch).index(2)
      assert patch[first_pad - 1] in (1, 2) and set(patch[first_pad:]) == {2}


def test_lm_packing_concatenates_with_or_without_eos():
  docs = _docs(5, 3, 9)
  plain, stats = _pack(docs, 4, 2, "lm", append_eos=False)
  np.testing.assert_array_equal(plain.reshape(-1), np.concatenate(docs)[:16])
  assert (stats.eos_tokens, stats.pad_tokens, stats.dropped_tokens) == (0, 0, 1)
  with_eos, stats = _pack(docs, 4, 2, "lm")
  expected = np.concatenate([np.append(d, 1) for d in docs])
  np.testing.assert_array_equal(with_eos.reshape(-1), expected[:20])
  assert (stats.eos_tokens, stats.pad_tokens, stats.dropped_tokens) == (3, 0, 0)


def test_block_length_must_be_a_multiple_of_k(tmp_path):
  with pytest.raises(DataError, match="block_length 10 is not a positive multiple of patch_size 4"):
    data.BlockPacker(10, 4, "ae", eos_id=1, pad_id=2)
  with pytest.raises(DataError, match="block_length 6 .* patch_size 4"):
    data.prepare(sources.ListSource(["a b"]), str(tmp_path / "o"), None, 6, 4, "ae")
  with pytest.raises(DataError, match="mode 'xx'"):
    data.BlockPacker(8, 4, "xx", eos_id=1, pad_id=2)


def test_split_rule_is_deterministic_and_near_the_fraction():
  docs = [f"document {i}" for i in range(4000)]
  valid = [d for d in docs if data.is_valid_document(d, 0.1)]
  assert valid == [d for d in docs if data.is_valid_document(d, 0.1)]
  assert 320 < len(valid) < 480
  assert not any(data.is_valid_document(d, 0.0) for d in docs[:100])


# ---------------------------------------------------------------- sources


def test_jsonl_text_and_token_sources(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "first doc", "meta": {"x": 1}}\n\n{"text": "second"}\n')
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write('{"body": "zipped"}\n')
  (tmp_path / "c.json").write_text('[{"text": "in an array"}]')
  assert list(data.open_source(str(tmp_path / "a.jsonl")).documents()) == ["first doc", "second"]
  assert list(data.open_source(f"jsonl:{tmp_path}/b.jsonl.gz;field=body").documents()) == ["zipped"]
  assert list(data.open_source(str(tmp_path / "c.json")).documents()) == ["in an array"]
  both = data.open_source([str(tmp_path / "a.jsonl"), str(tmp_path / "c.json")])
  assert list(both.documents()) == ["first doc", "second", "in an array"]
  # The reference's process.py: split on ' ' into pieces of max_words words.
  (tmp_path / "long.jsonl").write_text(json.dumps({"text": "a b c d e f g"}) + "\n")
  assert list(data.open_source(f"jsonl:{tmp_path}/long.jsonl;max_words=3").documents()) == [
      "a b c", "d e f", "g"]

  (tmp_path / "t1.txt").write_text("para one\nline two\n\n\npara two\n")
  (tmp_path / "t2.txt").write_text("only")
  assert list(data.open_source(f"{tmp_path}/t*.txt").documents()) == [
      "para one\nline two\n\n\npara two\n", "only"]
  assert list(data.open_source(f"text:{tmp_path}/t1.txt;doc=paragraph").documents()) == [
      "para one\nline two", "para two"]

  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
  for doc in ([5, 6, 7], [8]):
    writer.write(np.asarray(doc, "<i4").tobytes())
  writer.close()
  got = list(data.open_source(str(tmp_path / "docs.array_record")).documents())
  assert [g.tolist() for g in got] == [[5, 6, 7], [8]] and got[0].dtype == np.int32


def test_source_errors_name_the_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('\n{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
  with pytest.raises(DataError, match=r"bad.jsonl:4: malformed JSON line"):
    list(data.open_source(str(bad)).documents())
  nofield = tmp_path / "nofield.jsonl"
  nofield.write_text('{"text": "ok"}\n{"content": "x"}\n')
  with pytest.raises(DataError, match=r"nofield.jsonl:2: record has no 'text' field"):
    list(data.open_source(str(nofield)).documents())
  with pytest.raises(DataError, match=r"missing.jsonl: no such file"):
    data.open_source(str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match=r"glob .*/\*.parquet.txt matches no files"):
    data.open_source(f"{tmp_path}/*.parquet.txt")
  with pytest.raises(DataError, match="cannot infer the source kind of"):
    data.open_source(str(tmp_path / "x.parquet"))
  with pytest.raises(DataError, match=r"unknown option\(s\) \['feild'\]"):
    data.open_source(f"jsonl:{bad};feild=text")
  latin = tmp_path / "latin.txt"
  latin.write_bytes(b"caf\xe9")
  with pytest.raises(DataError, match="latin.txt: not valid UTF-8"):
    list(data.open_source(str(latin)).documents())
  assert "\n" not in str(pytest.raises(DataError, data.open_source, str(tmp_path / "m.txt")).value)


@pytest.mark.skipif(not os.path.isdir(REFERENCE_REPO), reason="reference repository not mirrored")
def test_reference_wikitext_document_file_reads_as_json_lines(tmp_path):
  path = tmp_path / "wikitext_document_level-test.json"
  path.write_bytes(subprocess.run(["git", "-C", REFERENCE_REPO, "show",
                                   "HEAD:data/wikitext_document_level-test.json"],
                                  check=True, capture_output=True).stdout)
  docs = list(data.open_source(str(path)).documents())
  assert len(docs) == 62 and docs[0].startswith(" = Robert Boulter = ")


# ---------------------------------------------------------------- prepare + manifest


def _read_split(directory, manifest, split):
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  src = ArrayRecordDataSource(blocks.shard_paths(str(directory), manifest, split))
  return np.stack([np.frombuffer(src[i], "<i4") for i in range(len(src))])


def test_prepare_writes_blocks_manifest_and_tokenizer(tmp_path, small_docs, bpe):
  docs = small_docs[:40]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = tmp_path / "ae"
  manifest = data.prepare(f"jsonl:{tmp_path}/in.jsonl", str(out), bpe, 64, 4, "ae", 0.2,
                          blocks_per_shard=50, progress=False)
  assert manifest == data.load_manifest(str(out))
  assert (manifest["block_length"], manifest["patch_size"], manifest["mode"]) == (64, 4, "ae")
  assert (manifest["vocab_size"], manifest["pad_id"], manifest["eos_id"]) == (400, 399, 0)
  assert manifest["tokenizer_fingerprint"] == bpe.fingerprint
  assert data.load_tokenizer(str(out)).fingerprint == bpe.fingerprint
  train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
  assert train["documents"] + valid["documents"] == len(docs)
  assert valid["documents"] == sum(data.is_valid_document(d, 0.2) for d in docs) > 0
  assert len(train["shards"]) == -(-train["blocks"] // 50) >= 2  # Several shards.
  # The shards hold exactly what the packer produces from the same documents.
  packer = data.BlockPacker(64, 4, "ae", eos_id=0, pad_id=399)
  ids = bpe.encode_batch([d for d in docs if not data.is_valid_document(d, 0.2)])
  expected = np.concatenate([packer.add(x) for x in ids])
  np.testing.assert_array_equal(_read_split(out, manifest, "train"), expected)
  assert train["tokens"] == expected.size
  assert train["document_tokens"] + train["eos_tokens"] + train["pad_tokens"] == (
      train["tokens"] + train["dropped_tokens"])
  with pytest.raises(DataError, match="already holds a prepared data set"):
    data.prepare(f"jsonl:{tmp_path}/in.jsonl", str(out), bpe, 64, 4, "ae", progress=False)
  assert not os.path.exists(str(out) + ".incomplete")


def test_prepare_explicit_valid_source_and_pretokenised_input(tmp_path, bpe):
  docs = [np.arange(i, i + 13, dtype=np.int32) % 300 + 1 for i in range(30)]
  manifest = data.prepare(sources.ListSource(docs), str(tmp_path / "lm"), bpe, 16, 4, "lm",
                          valid_fraction=0.5, valid_source_spec=sources.ListSource(docs[:5]),
                          append_eos=False, progress=False)
  assert manifest["splits"]["train"]["documents"] == 30 and manifest["splits"]["valid"]["documents"] == 5
  got = _read_split(tmp_path / "lm", manifest, "train")
  np.testing.assert_array_equal(got.reshape(-1), np.concatenate(docs)[: got.size])
  assert manifest["valid_fraction"] is None and manifest["append_eos"] is False


def test_check_manifest_names_the_mismatching_field(tmp_path):
  manifest = {"format": blocks.FORMAT, "block_length": 2048, "patch_size": 4, "vocab_size": 128257,
              "tokenizer_fingerprint": "abc", "source": "x"}
  data.check_manifest(manifest, block_length=2048, patch_size=4, vocab_size=128257,
                      tokenizer_fingerprint="abc", pad_id=None)
  for field, wrong in (("block_length", 1024), ("patch_size", 8), ("vocab_size", 32000),
                       ("tokenizer_fingerprint", "def")):
    with pytest.raises(DataError, match=f"manifest field '{field}' is .*, expected {wrong!r}"):
      data.check_manifest(manifest, **{field: wrong})
  with pytest.raises(DataError, match="unknown field"):
    data.check_manifest(manifest, blocklength=2048)
  with pytest.raises(DataError, match="manifest.json: no manifest"):
    data.load_manifest(str(tmp_path))
  (tmp_path / "manifest.json").write_text('{"format": "other"}')
  with pytest.raises(DataError, match="format 'other'"):
    data.load_manifest(str(tmp_path))


# ---------------------------------------------------------------- default corpus


@pytest.fixture(scope="module")
def built_corpus(tmp_path_factory):
  """The full default corpus, built once into a fresh cache directory."""
  old = os.environ.get("CALM_JAX_CACHE")
  os.environ["CALM_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  corpus._cached_corpus.cache_clear()
  try:
    start = time.perf_counter()
    train, valid = data.default_corpus()
    yield train, valid, time.perf_counter() - start, data.default_corpus_files()
  finally:
    corpus._cached_corpus.cache_clear()
    if old is None:
      os.environ.pop("CALM_JAX_CACHE")
    else:
      os.environ["CALM_JAX_CACHE"] = old


def test_default_corpus_size_split_and_speed(built_corpus):
  train, valid, seconds, (train_path, valid_path) = built_corpus
  chars = sum(map(len, train)) + sum(map(len, valid))
  print(f"default corpus: {len(train)}+{len(valid)} docs, {chars / 1e6:.2f}M chars, {seconds:.1f}s")
  assert chars >= 3_000_000
  assert len(train) > 500 and 0.02 < len(valid) / (len(train) + len(valid)) < 0.1
  assert not set(train) & set(valid)
  # Generous bound: the build takes ~5-10 s on a busy 2-core machine.
  assert seconds < 40
  assert os.path.dirname(train_path).endswith(corpus.corpus_key())
  with open(valid_path, encoding="utf-8") as f:
    assert [json.loads(x)["text"] for x in f] == valid
  assert any("iterator" in d for d in train)  # Real stdlib prose, not an empty shell.


def test_default_corpus_is_deterministic(built_corpus):
  train, valid = built_corpus[:2]
  first = corpus.build_documents(max_files=150)
  assert first == corpus.build_documents(max_files=150)
  # Files are processed in a fixed order, so a prefix build is a prefix of the full build.
  sub_train, sub_valid = corpus.split_documents(first)
  assert train[: len(sub_train)] == sub_train and valid[: len(sub_valid)] == sub_valid
  # A second call reads the cache rather than rebuilding.
  assert data.default_corpus() == (train, valid)
