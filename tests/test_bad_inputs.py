"""Every bad input to the five commands ends in one line naming the culprit, and touches nothing saved.

One table of cases over ``launch.train``, ``prepare``, ``evaluate``, ``generate`` and
``convert``.  Each case calls the command's ``main(argv)`` in this process (the
commands define their flags on a fresh ``FlagValues`` per call, so this is what
``python -m`` runs, minus the interpreter start and the JAX import) and asserts:
a non-zero exit status (2), exactly one line on stderr, starting ``error:`` and
naming the culprit, no traceback, and every file of the saved world (workdirs,
a prepared data set, a model folder, text files) byte-for-byte as before.
``--help`` of every command is checked the same way (exit 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from sharded.common import random_params, tiny_configs  # tests/ is on sys.path under pytest
from test_data_pipeline import _word_tokenizer

from calm_jax import data, interop
from calm_jax.data import sources
from launch import convert, evaluate, generate, prepare
from launch import train as train_cmd

WORDS = 63   # ids 0..62; PAD gets 63: the tiny configs' vocabulary of 64
COMMANDS = {"train": train_cmd.main, "prepare": prepare.main, "evaluate": evaluate.main,
            "generate": generate.main, "convert": convert.main}


def _words(rng, n):
  return " ".join(f"w{i}" for i in rng.integers(1, WORDS, n))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Saved work of every kind, and the paths the cases refer to as ``{name}``."""
  root = tmp_path_factory.mktemp("world")
  rng = np.random.default_rng(0)
  tokdir = root / "tok"
  tokdir.mkdir()
  tok = _word_tokenizer(str(tokdir), WORDS)
  ae_cfg, cfg, tf_cfg = tiny_configs()
  hf = root / "calm_hf"
  interop.export_energy(str(hf), cfg, random_params(cfg, 1), ae_cfg, random_params(ae_cfg, 0),
                        pad_token_id=tok.pad_id, eos_token_id=0)
  for name in ("tokenizer.json", "special_tokens_map.json"):
    shutil.copy(tokdir / name, hf / name)
  tf_hf = root / "tf_hf"
  interop.export_transformer(str(tf_hf), tf_cfg, random_params(tf_cfg, 2), pad_token_id=tok.pad_id,
                             eos_token_id=0)
  calm, tf = root / "calm", root / "tf"   # calm_jax workdirs (calm/autoencoder: its autoencoder's)
  convert.import_reference(str(hf), str(calm), tokenizer=str(tokdir))
  convert.import_reference(str(tf_hf), str(tf), tokenizer=str(tokdir))
  corrupt = root / "ae_corrupt"
  shutil.copytree(calm / "autoencoder", corrupt)
  for dirpath, _, files in os.walk(corrupt / "checkpoints"):
    for name in files:
      path = os.path.join(dirpath, name)
      if "METADATA" not in name and not name.endswith(".json"):
        with open(path, "r+b") as f:
          f.write(b"\x00garbage" * max(1, os.path.getsize(path) // 8))
  lm16 = root / "lm16"
  data.prepare(sources.ListSource([_words(rng, 40) for _ in range(12)]), str(lm16), tok, 16, 4, "lm",
               valid_source_spec=sources.ListSource([_words(rng, 40) for _ in range(4)]), progress=False)
  (root / "valid.txt").write_text("\n\n".join(_words(rng, 40) for _ in range(6)) + "\n")
  (root / "empty.txt").write_text("")
  (root / "tiny.txt").write_text("w1 w2\n")
  (root / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"text": \n')
  (root / "notext.jsonl").write_text('{"body": "w1 w2"}\n')
  (root / "blank_prompts.txt").write_text("\n  \n")
  (root / "afile.txt").write_text("not a directory\n")
  (root / "empty_dir").mkdir()
  (root / "bad_config").mkdir()
  (root / "bad_config" / "config.json").write_text("{not json")
  (root / "stray").mkdir()
  (root / "stray" / "notes.txt").write_text("someone's notes\n")
  eval_dir = calm / "eval"
  eval_dir.mkdir()
  (eval_dir / "brier_step0_valid_T16.json").write_text('{"brierlm": 1.0}\n')   # an earlier result
  paths = {name.replace(".", "_"): str(root / name) for name in (
      "tok", "calm_hf", "tf_hf", "calm", "tf", "ae_corrupt", "lm16", "valid.txt", "empty.txt", "tiny.txt",
      "bad.jsonl", "notext.jsonl", "blank_prompts.txt", "afile.txt", "empty_dir", "bad_config", "stray")}
  paths["ae"] = str(calm / "autoencoder")
  paths["new"] = str(root / "new_dir")   # never created: every case that names it fails first
  paths["long_prompt"] = _words(rng, 300)
  paths["root"] = str(root)
  return paths


def _snapshot(root: str) -> dict[str, str]:
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


T, P, E, G, C = "train", "prepare", "evaluate", "generate", "convert"
TF_TINY = "--config=experiments/transformer.py:tiny"
CALM_TINY = "--config=experiments/calm.py:tiny"
AE_TINY = "--config=experiments/autoencoder.py:tiny"
PREP = ["--source={valid_txt}", "--tokenizer={tok}", "--mode=lm", "--block_length=16", "--out_dir={new}"]

# (command, arguments, what the one line must contain)
CASES = [
    # --- train: flags and the config argument
    (T, ["--workdir={new}"], "--config: required"),
    (T, [TF_TINY], "--workdir: required"),
    (T, ["--config=experiments/nope.py:tiny", "--workdir={new}"],
     "--config=experiments/nope.py:tiny: [Errno 2]"),
    (T, ["--config={empty_dir}", "--workdir={new}"], "Is a directory"),
    (T, ["--config=experiments/transformer.py:size=Q", "--workdir={new}"], "config arg size=Q"),
    (T, ["--config=experiments/calm.py:K=abc", "--workdir={new}"], "config arg K='abc': expected an integer"),
    (T, ["--config=experiments/calm.py:K=3", "--workdir={new}"], "not a multiple of model.patch_size=3"),
    (T, ["--config=experiments/autoencoder.py:bogus=1", "--workdir={new}"], "config arg 'bogus': unknown"),
    (T, ["--config=experiments/autoencoder.py:tiny=maybe", "--workdir={new}"], "config arg tiny='maybe'"),
    (T, [AE_TINY, "--config.train.stepz=5", "--workdir={new}"], "--config.train.stepz: no such config field"),
    (T, [AE_TINY, "--config.trainx.steps=5", "--workdir={new}"],
     "--config.trainx.steps: no such config field"),
    (T, [AE_TINY, "--config.train.steps=abc", "--workdir={new}"], "--config.train.steps=abc"),
    (T, [TF_TINY, "--config.train.steps=0", "--workdir={new}"], "train.steps: must be >= 1, got 0"),
    (T, [TF_TINY, "--config.model.backbone.num_attention_heads=3", "--workdir={new}"],
     "model.backbone.num_attention_heads"),
    (T, [TF_TINY, "--config.kind=bogus", "--workdir={new}"], "kind: must be one of"),
    (T, [TF_TINY, "--config.optim.learning_rate=-1", "--workdir={new}"], "optim.learning_rate"),
    (T, [TF_TINY, "--config.data.mode=xx", "--workdir={new}"], "data.mode"),
    (T, [CALM_TINY, "--config.data.block_length=250", "--workdir={new}"], "data.block_length=250"),
    (T, [TF_TINY, "--config.mesh.data=3", "--workdir={new}"], "mesh"),
    (T, [TF_TINY, "--config.mesh.bogus=1", "--workdir={new}"], "--config.mesh.bogus: no such config field"),
    (T, [TF_TINY, "--workdir={new}", "--bogus=1"], "--bogus: unknown flag"),
    (T, [TF_TINY, "--workdir={new}", "stray_positional"], "unexpected argument 'stray_positional'"),
    (T, [CALM_TINY, "--config.ae_workdir=/nonexistent/ae", "--workdir={new}"], "ae_workdir: /nonexistent/ae"),
    (T, [CALM_TINY, "--config.ae_workdir={tf}", "--workdir={new}"],
     "holds a 'transformer' run, not an autoencoder"),
    (T, [TF_TINY, "--config.data.auto_prepare=False", "--config.data.dir=/nonexistent/data",
         "--workdir={new}"], "data.dir: /nonexistent/data"),
    (T, [TF_TINY, "--config.data.dir={lm16}", "--config.data.block_length=16", "--config.eval.brier=False",
         "--config.model.backbone.vocab_size=5000", "--workdir={new}"], "5000 in the config, but"),
    (T, [TF_TINY, "--config.data.dir={lm16}", "--config.eval.brier=False", "--workdir={new}"],
     "data.block_length: 256 in the config, but"),
    # --- train: the workdir
    (T, [TF_TINY, "--workdir={afile_txt}"], "is a file, not a directory"),
    (T, [TF_TINY, "--workdir="], "--workdir: required"),
    (T, [TF_TINY, "--config.data.dir={stray}", "--workdir={new}"],
     "data.dir: {stray}: is not empty and not a prepared"),
    (T, [TF_TINY, "--config.data.tokenizer=/nonexistent/tok", "--workdir={new}"],
     "data.tokenizer: /nonexistent/tok"),
    (T, [TF_TINY, "--config.data.auto_prepare=False", "--config.data.dir={afile_txt}", "--workdir={new}"],
     "data.dir: "),
    (T, [TF_TINY, "--config.train.global_batch_size=7", "--config.optim.grad_accum_steps=2",
         "--workdir={new}"], "optim.grad_accum_steps: 2 does not divide"),
    (T, [TF_TINY, "--workdir={ae}"], "holds an 'autoencoder' run, not a 'transformer' one"),
    (T, [AE_TINY, "--workdir={calm}"], "holds an 'energy' run, not an 'autoencoder' one"),
    (T, [TF_TINY, "--workdir={tf}"], "run of another model: model.backbone."),
    (T, [TF_TINY, "--workdir={bad_config}"], "config.json is unreadable"),
    (T, [TF_TINY, "--workdir={stray}"], "holds no config.json: not a calm_jax run"),
    (T, [TF_TINY, "--workdir={lm16}"], "holds no config.json: not a calm_jax run"),
    # --- prepare
    (P, PREP[1:], "--source: required"),
    (P, PREP[:-1], "--out_dir: required"),
    (P, [p for p in PREP if not p.startswith("--mode")], "--mode: required"),
    (P, ["--source=/nonexistent/x.txt", *PREP[1:]], "/nonexistent/x.txt: no such file"),
    (P, ["--source=/nonexistent/*.txt", *PREP[1:]], "matches no files"),
    (P, ["--source={afile_txt}.xyz", *PREP[1:]], "cannot infer the source kind"),
    (P, ["--source=jsonl:{bad_jsonl};bogus=1", *PREP[1:]], "unknown option"),
    (P, ["--source={bad_jsonl}", *PREP[1:]], "bad.jsonl:2: malformed JSON"),
    (P, ["--source={notext_jsonl}", *PREP[1:]], "notext.jsonl:1: record has no 'text' field"),
    (P, ["--source={empty_txt}", *PREP[1:]], "gives no training block"),
    (P, ["--source={tiny_txt}", *PREP[1:]], "gives no training block"),
    (P, [*PREP[:3], "--block_length=10", PREP[4]], "--block_length: "),
    (P, [*PREP[:3], "--block_length=0", PREP[4]], "--block_length: must be >= 1"),
    (P, [*PREP[:2], "--mode=xx", *PREP[3:]], "--mode=xx"),
    (P, [*PREP, "--patch_size=0"], "--patch_size: must be >= 1"),
    (P, [*PREP, "--valid_fraction=1.5"], "--valid_fraction: must lie in [0, 1)"),
    (P, [*PREP, "--blocks_per_shard=0"], "--blocks_per_shard"),
    (P, [*PREP, "--max_documents=0"], "--max_documents"),
    (P, [*PREP, "--block_length=abc"], "--block_length=abc"),
    (P, [PREP[0], "--tokenizer=/nonexistent/tok", *PREP[2:]], "/nonexistent/tok: no such tokenizer file"),
    (P, [PREP[0], "--vocab_size=100", *PREP[2:]], "--vocab_size: 100 is too small"),
    (P, [PREP[0], "--tokenizer={afile_txt}", *PREP[2:]], "not a tokenizers JSON file"),
    (P, ["--source=default:bogus", *PREP[1:]], "the default corpus has splits train|valid"),
    (P, [*PREP[:-1], "--out_dir={lm16}"], "already holds a prepared data set"),
    (P, [*PREP[:-1], "--out_dir={afile_txt}"], "--out_dir: "),
    (P, [*PREP[:-1], "--out_dir={calm}"], "is not empty"),
    # --- evaluate
    (E, ["--data={valid_txt}"], "--workdir: required"),
    (E, ["--workdir={calm}"], "--data: required"),
    (E, ["--workdir=/nonexistent/run", "--data={valid_txt}"],
     "--workdir: /nonexistent/run: no such directory"),
    (E, ["--workdir={afile_txt}", "--data={valid_txt}"], "is a file, not a directory"),
    (E, ["--workdir={empty_dir}", "--data={valid_txt}"], "config.json: no such file"),
    (E, ["--workdir={bad_config}", "--data={valid_txt}"], "malformed JSON"),
    (E, ["--workdir={calm}", "--data=/nonexistent/v.txt", "--block_length=16"],
     "/nonexistent/v.txt: no such file"),
    (E, ["--workdir={calm}", "--data={empty_txt}", "--block_length=16"], "empty.txt"),
    (E, ["--workdir={calm}", "--data={empty_dir}", "--block_length=16"], "without manifest.json"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--block_length=8192"], "--block_length: 8192 tokens"),
    (E, ["--workdir={tf}", "--data={valid_txt}", "--block_length=4096"], "beyond the model's context of 64"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--block_length=18"], "--block_length: "),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--block_length=0"], "--block_length: must be >= 1"),
    (E, ["--workdir={calm}", "--data={lm16}", "--split=bogus"], "--split: "),   # block length: the data's
    (E, ["--workdir={calm}", "--data={lm16}", "--block_length=32"], "prepared with block_length=16"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--batch_size=0"], "--batch_size: must be >= 1"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--step=-1"], "--step: must be >= 0"),
    (E, ["--workdir={calm}", "--data={afile_txt}.xyz", "--block_length=16"], "--data: "),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--num_blocks=-1"], "--num_blocks: must be >= 0"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--step=99"], "no step 99"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--estimator=bad"], "--estimator=bad"),
    (E, ["--workdir={calm}", "--data={lm16}", "--devices=64"], "--devices=64"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--block_length=16"], "exists (an earlier result)"),
    (E, ["--workdir={calm}", "--data={valid_txt}", "--output={calm}"], "--output: "),
    (E, ["--workdir={ae_corrupt}", "--data={valid_txt}"], "cannot restore params"),
    # --- generate
    (G, ["--workdir={calm}"], "--prompt: give --prompt and/or --prompts_file"),
    (G, ["--prompt=w1"], "--workdir: required"),
    (G, ["--workdir={calm}", "--prompts_file=/nonexistent/p.txt"], "--prompts_file: /nonexistent/p.txt"),
    (G, ["--workdir={calm}", "--prompts_file={blank_prompts_txt}"], "holds no prompt"),
    (G, ["--workdir={calm}", "--prompt=w1", "--max_new_tokens=0"], "--max_new_tokens: must be >= 1"),
    (G, ["--workdir={calm}", "--prompt=w1", "--method=bogus"], "--method=bogus"),
    (G, ["--workdir={calm}", "--prompt=w1", "--temperature=0.3", "--method=batch"],
     "--temperature/--method: Method 'batch'"),
    (G, ["--workdir={tf}", "--prompt=w1", "--temperature=-1"], "T=-1"),
    (G, ["--workdir={ae}", "--prompt=w1"], "holds an autoencoder, which does not generate"),
    (G, ["--workdir=/nonexistent/run", "--prompt=w1"], "/nonexistent/run: no such directory"),
    (G, ["--workdir={calm}", "--prompt=w1", "--step=7"], "no step 7"),
    (G, ["--workdir={calm}", "--prompt=w1", "--batch_size=0"], "--batch_size: must be >= 1"),
    (G, ["--workdir={calm}", "--prompt= "], "--prompt: a prompt is empty"),
    (G, ["--workdir={calm}", "--prompts_file={empty_dir}"], "--prompts_file: "),
    (G, ["--workdir={calm}", "--prompt=w1", "--num_candidates=0"], "--num_candidates: must be >= 1"),
    (G, ["--workdir={calm}", "--prompt={long_prompt}", "--max_new_tokens=16"], "prompt 1 has 300 tokens"),
    (G, ["--workdir={tf}", "--prompt=w1", "--max_new_tokens=64"], "--max_new_tokens: 64 leaves no room"),
    # --- convert
    (C, ["--dst={new}"], "--src: required"),
    (C, ["--src={calm_hf}"], "--dst: required"),
    (C, ["--src=/nonexistent/hf", "--dst={new}"], "--src: /nonexistent/hf: no such directory"),
    (C, ["--src={afile_txt}", "--dst={new}"], "--src: "),
    (C, ["--src={empty_dir}", "--dst={new}"], "is empty"),
    (C, ["--src={stray}", "--dst={new}"], "config.json: missing"),
    (C, ["--src={calm_hf}", "--dst={calm}"], "--dst: "),
    (C, ["--src={calm_hf}", "--dst={afile_txt}"], "is a file"),
    (C, ["--direction=export", "--src={calm}", "--dst={tf_hf}"], "is not empty"),
    (C, ["--direction=export", "--src={empty_dir}", "--dst={new}"], "is empty"),
    (C, ["--direction=export", "--src={stray}", "--dst={new}"], "config.json: no such file"),
    (C, ["--direction=bogus", "--src={calm_hf}", "--dst={new}"], "--direction=bogus"),
    (C, ["--src={calm_hf}", "--dst={calm_hf}"], "--dst: "),
    (C, ["--src={calm_hf}", "--dst={new}", "--kind=transformer"], "missing key"),
    (C, ["--src={calm_hf}", "--dst={new}", "--tokenizer=/nonexistent/tok"], "--tokenizer: /nonexistent/tok"),
    (C, ["--src={calm_hf}", "--dst={new}", "--ae_src=/nonexistent/ae"], "--ae_src: /nonexistent/ae"),
]


def _call(command, args, world, capfd):
  argv = [f"launch.{command}", *(a.format(**world) for a in args)]
  capfd.readouterr()
  with pytest.raises(SystemExit) as e:
    COMMANDS[command](argv)
  out, err = capfd.readouterr()
  return e.value.code, out, err


def test_enough_cases():
  assert len(CASES) >= 50
  assert {c for c, _, _ in CASES} == set(COMMANDS)


@pytest.mark.parametrize("command, args, expected", CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_touches_nothing(world, capfd, command, args, expected):
  before = _snapshot(world["root"])
  code, out, err = _call(command, args, world, capfd)
  lines = err.strip().splitlines()
  assert code == 2, (code, out[-2000:], err[-2000:])
  assert len(lines) == 1, err[-3000:]
  assert lines[0].startswith("error: ") and expected.format(**world) in lines[0], lines[0]
  assert "Traceback" not in out + err and "Event loop is closed" not in out + err
  assert _snapshot(world["root"]) == before   # nothing written, nothing changed, nothing deleted


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_works_on_every_command(world, capfd, command):
  for flag in ("--help", "--helpfull"):
    code, out, err = _call(command, [flag], world, capfd)
    assert code == 0 and "Traceback" not in err, err
    assert "--[no]verbose:" in out and f"launch.{command}" in out


def test_prompt_cut_from_the_left_with_one_warning(capfd):
  _, cfg, tf_cfg = tiny_configs()   # 64 positions: CALM 64 chunks of 4 tokens, the baseline 64 tokens
  ids = [list(range(1, 301)), [1, 2, 3]]
  out = generate.fit_context("energy", cfg, ids, 16, "truncate")
  assert out[0] == list(range(61, 301)) and out[1] == [1, 2, 3]    # 256 - 16 = 240 tokens kept
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: prompt 1: cut from the left to its last 240 of 300")
  kept = generate.fit_context("transformer", tf_cfg, [list(range(70))], 4, "truncate")[0]
  assert kept == list(range(10, 70))
  with pytest.raises(ValueError, match="prompt 1 has 70 tokens"):
    generate.fit_context("transformer", tf_cfg, [list(range(70))], 4, "refuse")


def test_vocabulary_follows_the_prepared_data(world):
  from calm_jax.training import train
  from experiments import registry
  c = registry.get_config("transformer_tiny")
  with c.unlocked():
    c.data.dir = world["lm16"]
  note = train.follow_data_vocab(c, [])
  assert c.model.backbone.vocab_size == 64 and c.data.vocab_size == 64
  assert "model.backbone.vocab_size: 64 from" in note and "(the config said 1024)" in note
  c = registry.get_config("transformer_tiny")
  with c.unlocked():
    c.data.dir = world["lm16"]
    c.model.backbone.vocab_size = 5000
  assert train.follow_data_vocab(c, ["model.backbone.vocab_size"]) is None   # set explicitly: kept
  assert c.model.backbone.vocab_size == 5000
  c = registry.get_config("ae_tiny")   # data not prepared, BPE to train: the model's size sets it
  with c.unlocked():
    c.data.dir = os.path.join(world["root"], "not_prepared")
    c.model.vocab_size = 2048
  train.follow_data_vocab(c, ["model.vocab_size"])
  assert c.data.vocab_size == 2048
  train.resolve(c)   # no 'BPE tokenizer auto_prepare trains' complaint


def test_list_experiments_counts_the_autoencoder_calm_runs_on():
  from launch import list_experiments
  line = list_experiments.describe("calm_tiny")
  assert "(+0.71M frozen autoencoder, ae_tiny)" in line, line
  assert "ae_k4" in list_experiments.describe("calm_m")


def test_evaluate_result_names_carry_data_and_block_length():
  assert evaluate._data_tag("/data/pile_lm_2048", "valid", True) == "pile_lm_2048-valid"
  assert evaluate._data_tag("/calm/wikitext_document_level-test.json", "valid", False) == \
      "wikitext_document_level-test"
  assert evaluate._data_tag("jsonl:/pile/0[01].jsonl;max_words=10", "valid", False) == "0_01"
  assert json.loads(json.dumps({"ok": 1}))   # (the file names themselves: the 'exists' case above)


def test_a_restart_may_change_how_steps_run_but_not_the_model(tmp_path):
  from calm_jax.configs import ConfigError
  from calm_jax.training import train
  from experiments import registry
  saved = registry.get_config("transformer_tiny").to_dict()
  (tmp_path / "config.json").write_text(json.dumps(saved))
  ours = registry.get_config("transformer_tiny").to_dict()
  ours["model"]["backbone"].update(remat_policy="full", attention_impl="dot_product_attention")
  ours["optim"]["learning_rate"] = 1e-4
  assert train.check_workdir(str(tmp_path), ours) == saved
  ours["model"]["backbone"]["scan_layers"] = True   # another parameter layout
  with pytest.raises(ConfigError, match="model.backbone.scan_layers=False there, True here"):
    train.check_workdir(str(tmp_path), ours)
