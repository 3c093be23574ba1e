"""Tests for calm_jax.cost.flops: parameter counts, Table 1 reproduction, structural sanity, peak/MFU."""

import math

import numpy as np
import pytest

from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig
from calm_jax.cost import flops

# A tiny config with GQA and every dimension distinct, so a swapped factor shows.
_BB = LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2)
_AE = AutoencoderConfig(vocab_size=37, hidden_size=20, intermediate_size=28, latent_size=6, patch_size=3)
_CALM = EnergyConfig(backbone=_BB, patch_size=3, latent_size=6, noise_size=5, num_mlp_layers=2)
_TF = TransformerConfig(backbone=_BB)


# --------------------------------------------------------------------------- hand-built shape trees


def _ref_llama_shapes(c: LlamaConfig, prefix: str) -> dict:
  """Weight shapes of HF ``LlamaModel`` keyed as in the reference checkpoints (CALM_NOTES §9)."""
  d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
  s = {f"{prefix}.embed_tokens.weight": (c.vocab_size, d), f"{prefix}.norm.weight": (d,)}
  for i in range(c.num_hidden_layers):
    p = f"{prefix}.layers.{i}"
    s.update({f"{p}.self_attn.q_proj.weight": (c.num_attention_heads * hd, d),
              f"{p}.self_attn.k_proj.weight": (c.num_key_value_heads * hd, d),
              f"{p}.self_attn.v_proj.weight": (c.num_key_value_heads * hd, d),
              f"{p}.self_attn.o_proj.weight": (d, c.num_attention_heads * hd),
              f"{p}.mlp.gate_proj.weight": (c.intermediate_size, d),
              f"{p}.mlp.up_proj.weight": (c.intermediate_size, d),
              f"{p}.mlp.down_proj.weight": (d, c.intermediate_size),
              f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,)})
  return s


def _linear(name, n_in, n_out):
  return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _ln(name, d):
  return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _ref_energy_shapes(c: EnergyConfig) -> dict:
  d, k = c.backbone.hidden_size, c.patch_size
  s = _ref_llama_shapes(c.backbone, "transformer")
  s.update(_linear("embed_proj.0", k * d, 2 * d))
  s.update(_linear("embed_proj.2", 2 * d, d))
  s.update(_ln("embed_proj.3", d))
  h = "generative_head"
  s.update(_linear(f"{h}.noise_embd", c.noise_size, d))
  s.update(_linear(f"{h}.hidden_embd", d, d))
  s.update(_ln(f"{h}.norm_noise", d))
  s.update(_ln(f"{h}.norm_hidden", d))
  for j in range(c.num_mlp_layers):
    b = f"{h}.mlp_blocks.{j}"
    s.update(_ln(f"{b}.in_ln", d))
    s.update(_linear(f"{b}.linears.0", 2 * d, d))
    s.update(_linear(f"{b}.linears.2", d, d))
    s.update(_linear(f"{b}.linears.4", d, 2 * d))
    s.update(_linear(f"{b}.down_proj", d, d))
  s.update(_ln(f"{h}.final_layer.in_ln", d))
  s.update(_linear(f"{h}.final_layer.linears.0", d, d))
  s.update(_linear(f"{h}.final_layer.linears.2", d, c.latent_size))
  return s


def _ref_ae_shapes(c: AutoencoderConfig) -> dict:
  d, ff, k, l = c.hidden_size, c.intermediate_size, c.patch_size, c.latent_size
  s = {"encoder.embed_tokens.weight": (c.vocab_size, d), "encoder.norm.weight": (d,),
       "decoder.norm.weight": (d,)}
  for part, n in (("encoder.encoder_layers", c.num_encoder_layers), ("decoder.decoder_layers",
                                                                     c.num_decoder_layers)):
    for i in range(n):
      s.update({f"{part}.{i}.layernorm.weight": (d,), f"{part}.{i}.mlp.gate_proj.weight": (ff, d),
                f"{part}.{i}.mlp.up_proj.weight": (ff, d), f"{part}.{i}.mlp.down_proj.weight": (d, ff)})
  s.update(_linear("encoder.squeeze_layer", k * d, d))
  s.update(_linear("encoder.hidden_to_latent", d, 2 * l))
  s.update(_linear("decoder.latent_to_hidden", l, d))
  s.update(_linear("decoder.expand_layer", d, k * d))
  return s   # the decoder's output matrix is the tied embedding: no extra leaf


def _size(shapes: dict) -> int:
  return sum(math.prod(v) for v in shapes.values())


def test_params_equal_hand_built_shape_trees():
  assert flops.autoencoder_params(_AE).total == _size(_ref_ae_shapes(_AE))
  assert flops.energy_params(_CALM).total == _size(_ref_energy_shapes(_CALM))
  lm = _ref_llama_shapes(_BB, "model")
  lm["lm_head.weight"] = (_BB.vocab_size, _BB.hidden_size)
  assert flops.transformer_params(_TF).total == _size(lm)


@pytest.mark.parametrize("kind,cfg", [("autoencoder", _AE), ("energy", _CALM), ("transformer", _TF)])
def test_params_equal_calm_jax_models(kind, cfg):
  """The formulas agree with the flax modules' abstract parameters (eval_shape: nothing allocated)."""
  models = pytest.importorskip("calm_jax.models")
  assert flops.count_params(kind, cfg).total == models.count_params(models.abstract_params(cfg))


def test_param_parts_and_embedding_split():
  for kind, cfg in (("autoencoder", _AE), ("energy", _CALM), ("transformer", _TF)):
    p = flops.count_params(kind, cfg)
    assert sum(p.parts.values()) == p.total
    assert p.trainable == p.total
  tf = flops.transformer_params(_TF)
  assert tf.embedding == 2 * _BB.vocab_size * _BB.hidden_size           # untied embedding and LM head
  calm = flops.energy_params(_CALM, _AE)
  assert calm.embedding == _BB.vocab_size * _BB.hidden_size
  assert calm.frozen == flops.autoencoder_params(_AE).total
  assert calm.non_embedding == calm.total - calm.embedding


def test_autoencoder_count_and_flops_match_notes():
  ae = AutoencoderConfig()
  assert flops.autoencoder_params(ae).total == 75_832_064             # "75.8M" (CALM_NOTES §1.1)
  assert flops.autoencoder_encoder_flops(ae) / 1e6 == pytest.approx(5.5, abs=0.05)
  assert flops.autoencoder_decoder_flops(ae) / 1e6 == pytest.approx(136.8, abs=0.05)


@pytest.mark.parametrize("name,notes", [("transformer_s", 281.96e6), ("transformer_m", 465.08e6),
                                        ("transformer_l", 847.04e6), ("calm_m", 371.73e6),
                                        ("calm_l", 735.33e6), ("calm_xl", 1829.8e6)])
def test_paper_param_counts(name, notes):
  spec = flops.paper_configs()[name]
  ours = flops.count_params(spec[0], spec[1]).total
  assert ours == pytest.approx(notes, rel=2e-4)                         # CALM_NOTES §2.1, §3
  assert flops.params_match_paper(ours, flops.PAPER_TABLE1[name][0])   # within 0.5% of the paper's figure


def test_params_match_paper_truncation():
  assert flops.params_match_paper(281.96e6, 281e6)
  assert flops.params_match_paper(1829.8e6, 1.82e9)
  assert not flops.params_match_paper(290e6, 281e6)
  assert not flops.params_match_paper(279e6, 281e6)


# --------------------------------------------------------------------------- Table 1


def test_table1_tolerance_targets():
  _, cells = flops.paper_table1()
  res = {(c.model, c.column): c.residual for c in cells if c.column != "params"}
  assert len(res) == 12
  assert sum(abs(r) <= 0.03 for r in res.values()) >= 8, res
  assert max(abs(r) for r in res.values()) <= 0.12, res
  # The headline: CALM-M saves ~44% of training and ~34% of inference FLOPs against Transformer-S.
  rows, _ = flops.paper_table1()
  by = {r.name: r for r in rows}
  train, infer = flops.savings(by["calm_m"], by["transformer_s"])
  assert train == pytest.approx(0.439, abs=0.03) and infer == pytest.approx(0.341, abs=0.01)


def test_transformer_table1_cells_under_notes_formula():
  # CALM_NOTES §6.3's Transformer column, to the digit quoted there.
  rows, _ = flops.paper_table1()
  by = {r.name: r for r in rows}
  for name, inf, tr in (("transformer_s", 4.42e8, 6.64e20), ("transformer_m", 8.02e8, 12.02e20),
                        ("transformer_l", 15.01e8, 22.52e20)):
    assert by[name].infer_flops_per_token == pytest.approx(inf, rel=1e-3)
    assert by[name].train_flops == pytest.approx(tr, rel=1e-3)


def test_calm_inference_cells_under_notes_formula():
  rows, _ = flops.paper_table1()
  by = {r.name: r for r in rows}
  for name, inf in (("calm_m", 2.91e8), ("calm_l", 4.56e8), ("calm_xl", 9.71e8)):
    assert by[name].infer_flops_per_token == pytest.approx(inf, rel=2e-3)
  # The "reference" head convention is the notes' training formula (3.84 / 8.12 / 21.6 e20).
  rows, _ = flops.paper_table1("reference")
  by = {r.name: r for r in rows}
  for name, tr in (("calm_m", 3.84e20), ("calm_l", 8.12e20), ("calm_xl", 21.6e20)):
    assert by[name].train_flops == pytest.approx(tr, rel=3e-3)


# --------------------------------------------------------------------------- structure


def test_backbone_share_scales_with_one_over_k():
  specs = flops.paper_configs()
  b = {k: flops.flops_per_token("energy", specs[f"calm_l_k{k}"][1], 2048, train=True)
       for k in (1, 2, 4, 8)}
  for k in (1, 2, 4):
    assert b[k].backbone == pytest.approx(2 * b[2 * k].backbone)
    assert b[k].attention == pytest.approx(2 * b[2 * k].attention)
  # The AE decoder's vocabulary projection does not shrink with K, so inference cost falls less than 1/K.
  inf = {k: flops.flops_per_token("energy", specs[f"calm_l_k{k}"][1], 2048, train=False).total
         for k in (1, 2, 4, 8)}
  assert inf[1] > inf[2] > inf[4] > inf[8] > 2 * 512 * 128257
  assert inf[4] > inf[2] / 2


def test_train_is_three_forwards_and_attention_linear_in_context():
  tr = flops.transformer_flops(_TF, 100, train=True)
  inf = flops.transformer_flops(_TF, 100, train=False)
  assert tr.total == pytest.approx(3 * inf.total)
  a1 = flops.transformer_flops(_TF, 100, train=False).attention
  a2 = flops.transformer_flops(_TF, 300, train=False).attention
  assert a2 == pytest.approx(3 * a1)
  # By hand: per layer and token 2·(q,k,v,o: 24·24 + 2·24·8 + 24·24) + 2·3·24·40 matmul FLOPs.
  assert inf.backbone == 3 * 2 * (24 * 24 * 2 + 2 * 24 * 8 + 3 * 24 * 40)
  assert inf.attention == 3 * 4 * 100 * 24
  assert inf.lm_head == 2 * 24 * 37


def test_gqa_cuts_params_not_attention_flops():
  mha = TransformerConfig(backbone=_BB.replace(num_key_value_heads=6))
  assert flops.transformer_params(mha).total > flops.transformer_params(_TF).total
  assert (flops.transformer_flops(mha, 64, train=False).attention
          == flops.transformer_flops(_TF, 64, train=False).attention)


def test_head_conventions():
  f = {c: flops.head_flops_per_position(_CALM, 8, c) for c in flops.HEAD_CONVENTIONS}
  assert f["factored"] < f["shared_cond"] < f["reference"]
  one = {c: flops.head_flops_per_position(_CALM, 1, c) for c in flops.HEAD_CONVENTIONS}
  assert len(set(one.values())) == 1                                   # one sample: nothing to share
  d, e, l, nb = 24, 5, 6, 2
  assert one["reference"] == 2 * (e * d + d * d + nb * 6 * d * d + d * d + d * l)
  for c in flops.HEAD_CONVENTIONS:                                     # affine in N
    f2, f4, f6 = (flops.head_flops_per_position(_CALM, n, c) for n in (2, 4, 6))
    assert f6 - f4 == pytest.approx(f4 - f2)
  with pytest.raises(ValueError):
    flops.head_flops_per_position(_CALM, 8, "nope")


def test_energy_flops_parts():
  tr = flops.energy_flops(_CALM, _AE, 50, train=True)
  inf = flops.energy_flops(_CALM, _AE, 50, train=False)
  assert tr.ae_decoder == 0 and tr.ae_encoder > 0 and tr.lm_head == 0
  assert inf.ae_encoder == 0 and inf.ae_decoder > 0
  assert tr.backbone == pytest.approx(3 * inf.backbone)
  assert tr.compression == pytest.approx(3 * inf.compression)
  assert inf.compression == 2 * (3 * 24 * 48 + 48 * 24) / 3
  with pytest.raises(ValueError):
    flops.energy_flops(_CALM, _AE.replace(latent_size=7), 50, train=True)


def test_compare_and_training_total():
  rows = flops.compare({"c": ("energy", _CALM, _AE), "t": ("transformer", _TF)}, tokens=1e6, context=10,
                       ae_tokens=1e3)
  assert [r.name for r in rows] == ["c", "t"]
  c, t = rows
  assert c.params.frozen == flops.autoencoder_params(_AE).total
  assert c.train_flops == pytest.approx(1e6 * c.train_breakdown.total
                                        + 1e3 * flops.autoencoder_flops(_AE, train=True).total)
  assert t.train_flops == pytest.approx(1e6 * t.train_breakdown.total)
  s_train, s_infer = flops.savings(c, t)
  assert s_train == pytest.approx(1 - c.train_flops / t.train_flops)
  # A CALM spec without its AE config gets the default AE with CALM's K, l, V.
  big = flops.paper_configs()["calm_m"]
  (r,) = flops.compare({"m": big[:2]}, 1.0, 2048)
  (r3,) = flops.compare({"m": big}, 1.0, 2048)
  assert r.train_flops == r3.train_flops


# --------------------------------------------------------------------------- peak and MFU


def test_measure_matmul_peak_and_mfu():
  peak = flops.measure_matmul_peak("float32", n=128, iters=2)
  assert np.isfinite(peak) and peak > 1e6
  assert flops.mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    flops.mfu(1.0, 1.0, 0.0)


def test_cli_formats():
  cc = pytest.importorskip("launch.compare_cost")
  text = cc.format_paper("factored")
  assert "calm_xl" in text and "FLOPs cells within 3%" in text
  rows = flops.compare({n: flops.paper_configs()[n] for n in ("calm_m", "transformer_s")}, 5e11, 2048)
  assert "calm_m" in cc.format_rows(rows) and "transformer_s" in cc.format_savings(rows)
  assert "ae_decoder" in cc.format_breakdown(rows)
