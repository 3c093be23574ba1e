"""Reference checkpoint import/export without the reference code: synthetic state dicts
with the reference's key names and shapes (CALM_NOTES section 9), written independently here."""

import json
import os

import jax
import numpy as np
import pytest

from calm_jax import interop, models
from calm_jax.configs import AutoencoderConfig, EnergyConfig, LlamaConfig, TransformerConfig

V, D, F, H, G, L, K, E = 31, 16, 24, 4, 2, 6, 4, 5
DH = D // H


def _llama_sd(prefix, n_layers, rng):
  sd = {f"{prefix}.embed_tokens.weight": rng.normal(size=(V, D)), f"{prefix}.norm.weight": rng.normal(size=(D,))}
  for i in range(n_layers):
    p = f"{prefix}.layers.{i}"
    sd.update({f"{p}.self_attn.q_proj.weight": rng.normal(size=(H * DH, D)),
               f"{p}.self_attn.k_proj.weight": rng.normal(size=(G * DH, D)),
               f"{p}.self_attn.v_proj.weight": rng.normal(size=(G * DH, D)),
               f"{p}.self_attn.o_proj.weight": rng.normal(size=(D, H * DH)),
               f"{p}.mlp.gate_proj.weight": rng.normal(size=(F, D)),
               f"{p}.mlp.up_proj.weight": rng.normal(size=(F, D)),
               f"{p}.mlp.down_proj.weight": rng.normal(size=(D, F)),
               f"{p}.input_layernorm.weight": rng.normal(size=(D,)),
               f"{p}.post_attention_layernorm.weight": rng.normal(size=(D,))})
  return sd


def _ae_sd(rng, d=12, ff=20):
  sd = {"encoder.embed_tokens.weight": rng.normal(size=(V, d))}
  for side, name in (("encoder", "encoder_layers"), ("decoder", "decoder_layers")):
    for i in range(2):
      p = f"{side}.{name}.{i}"
      sd.update({f"{p}.layernorm.weight": rng.normal(size=(d,)), f"{p}.mlp.gate_proj.weight": rng.normal(size=(ff, d)),
                 f"{p}.mlp.up_proj.weight": rng.normal(size=(ff, d)),
                 f"{p}.mlp.down_proj.weight": rng.normal(size=(d, ff))})
    sd[f"{side}.norm.weight"] = rng.normal(size=(d,))
  sd.update({"encoder.squeeze_layer.weight": rng.normal(size=(d, K * d)), "encoder.squeeze_layer.bias": rng.normal(size=(d,)),
             "encoder.hidden_to_latent.weight": rng.normal(size=(2 * L, d)),
             "encoder.hidden_to_latent.bias": rng.normal(size=(2 * L,)),
             "decoder.latent_to_hidden.weight": rng.normal(size=(d, L)),
             "decoder.latent_to_hidden.bias": rng.normal(size=(d,)),
             "decoder.expand_layer.weight": rng.normal(size=(K * d, d)),
             "decoder.expand_layer.bias": rng.normal(size=(K * d,))})
  return sd


def _head_sd(prefix, rng, blocks=2):
  lin = lambda o, i: {"weight": rng.normal(size=(o, i)), "bias": rng.normal(size=(o,))}
  ln = lambda: {"weight": rng.normal(size=(D,)), "bias": rng.normal(size=(D,))}
  parts = {"noise_embd": lin(D, E), "hidden_embd": lin(D, D), "norm_noise": ln(), "norm_hidden": ln(),
           "final_layer.in_ln": ln(), "final_layer.linears.0": lin(D, D), "final_layer.linears.2": lin(L, D)}
  for j in range(blocks):
    parts.update({f"mlp_blocks.{j}.in_ln": ln(), f"mlp_blocks.{j}.linears.0": lin(D, 2 * D),
                  f"mlp_blocks.{j}.linears.2": lin(D, D), f"mlp_blocks.{j}.linears.4": lin(2 * D, D),
                  f"mlp_blocks.{j}.down_proj": lin(D, D)})
  return {f"{prefix}.{m}.{w}": v for m, d in parts.items() for w, v in d.items()}


def _write(folder, sd, cfg):
  interop.write_state_dict(str(folder), {k: np.asarray(v, np.float32) for k, v in sd.items()})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)


LLAMA_JSON = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=H,
                  num_key_value_heads=G, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu")


def _energy_folder(tmp_path, rng):
  sd = _llama_sd("transformer", 2, rng)
  sd.update({"embed_proj.0.weight": rng.normal(size=(2 * D, K * D)), "embed_proj.0.bias": rng.normal(size=(2 * D,)),
             "embed_proj.2.weight": rng.normal(size=(D, 2 * D)), "embed_proj.2.bias": rng.normal(size=(D,)),
             "embed_proj.3.weight": rng.normal(size=(D,)), "embed_proj.3.bias": rng.normal(size=(D,))})
  head = _head_sd("generative_head", rng)
  sd.update(head)
  sd.update({"mlp_generator" + k[len("generative_head"):]: v for k, v in head.items()})
  ae = _ae_sd(rng)
  sd.update({"ae_model." + k: v for k, v in ae.items()})
  sd["ae_model.decoder.lm_head_weight"] = ae["encoder.embed_tokens.weight"]
  cfg = dict(LLAMA_JSON, patch_size=K, latent_size=L, noise_size=E, num_mlp_layers=2, num_samples=8, beta=1.0,
             ae_path="/nonexistent/authors/server", model_type="energy")
  folder = tmp_path / "energy"
  folder.mkdir()
  _write(folder, sd, cfg)
  return folder, sd


def test_import_energy_places_every_tensor(tmp_path):
  rng = np.random.default_rng(0)
  folder, sd = _energy_folder(tmp_path, rng)
  cfg, p, ae_cfg, ae_p = interop.import_energy(str(folder))
  assert cfg.backbone.num_key_value_heads == G and cfg.noise_size == E and ae_cfg.hidden_size == 12
  q = p["transformer"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(q, sd["transformer.layers.1.self_attn.q_proj.weight"].T.reshape(D, H, DH), rtol=1e-6)
  o = p["transformer"]["layers_0"]["self_attn"]["o_proj"]["kernel"]
  np.testing.assert_allclose(o, sd["transformer.layers.0.self_attn.o_proj.weight"].T.reshape(H, DH, D), rtol=1e-6)
  np.testing.assert_allclose(p["generative_head"]["mlp_blocks_1"]["linear_2"]["kernel"],
                             sd["generative_head.mlp_blocks.1.linears.4.weight"].T, rtol=1e-6)
  np.testing.assert_allclose(p["embed_proj_3"]["scale"], sd["embed_proj.3.weight"], rtol=1e-6)
  np.testing.assert_allclose(ae_p["decoder"]["expand"]["bias"], sd["ae_model.decoder.expand_layer.bias"], rtol=1e-6)
  n_ref = sum(v.size for k, v in sd.items() if not k.startswith(("mlp_generator.", "ae_model.decoder.lm_head")))
  assert models.count_params(p) + models.count_params(ae_p) == n_ref


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.update({"transformer.layers.0.mlp.gate_projection.weight":
                           sd.pop("transformer.layers.0.mlp.gate_proj.weight")}),
     "missing key 'transformer.layers.0.mlp.gate_proj.weight'"),
    (lambda sd: sd.update({"transformer.extra.weight": np.zeros(3)}), "unexpected key 'transformer.extra.weight'"),
    (lambda sd: sd.update({"embed_proj.2.bias": np.zeros(D + 1)}), "key 'embed_proj.2.bias' has shape"),
    (lambda sd: sd.update({"mlp_generator.noise_embd.bias": np.zeros(D)}), "mlp_generator.noise_embd.bias"),
])
def test_bad_checkpoints_name_the_key(tmp_path, mutate, message):
  folder, sd = _energy_folder(tmp_path, np.random.default_rng(1))
  mutate(sd)
  interop.write_state_dict(str(folder), {k: np.asarray(v, np.float32) for k, v in sd.items()})
  with pytest.raises(interop.InteropError, match=message.replace("(", r"\(")):
    interop.import_energy(str(folder))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(interop.InteropError, match="nope"):
    interop.import_transformer(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(interop.InteropError, match="config.json"):
    interop.import_transformer(str(tmp_path / "empty"))


def test_unsupported_config_is_refused(tmp_path):
  folder = tmp_path / "llama"
  folder.mkdir()
  _write(folder, {**_llama_sd("model", 2, np.random.default_rng(2)), "lm_head.weight": np.zeros((V, D))},
         dict(LLAMA_JSON, rope_scaling={"type": "linear", "factor": 2.0}))
  with pytest.raises(interop.InteropError, match="rope_scaling"):
    interop.import_transformer(str(folder))


@pytest.mark.parametrize("scan", [False, True])
def test_export_import_is_exact(tmp_path, scan):
  bb = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=H,
                   num_key_value_heads=G, scan_layers=scan)
  en = EnergyConfig(backbone=bb, patch_size=K, latent_size=L, noise_size=E, num_mlp_layers=2)
  ae = AutoencoderConfig(vocab_size=V, hidden_size=12, intermediate_size=20, latent_size=L, patch_size=K)
  tr = TransformerConfig(backbone=bb)
  p_en, p_ae, p_tr = (models.init_params(c, jax.random.key(i)) for i, c in enumerate((en, ae, tr)))
  interop.export_energy(str(tmp_path / "e"), en, p_en, ae, p_ae)
  interop.export_transformer(str(tmp_path / "t"), tr, p_tr)
  cfg2, p2, ae2, pa2 = interop.import_energy(str(tmp_path / "e"), scan_layers=scan)
  cfg3, p3 = interop.import_transformer(str(tmp_path / "t"), scan_layers=scan)
  assert (cfg2, ae2, cfg3) == (en, ae, tr)
  for a, b in ((p2, p_en), (pa2, p_ae), (p3, p_tr)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  # the exported energy folder carries the head twice and the AE (with its tied matrix) under ae_model.*
  sd = interop.read_state_dict(str(tmp_path / "e"))
  assert "mlp_generator.final_layer.linears.2.weight" in sd and "ae_model.decoder.lm_head_weight" in sd
  # and the stand-alone autoencoder folder that config.json's ae_path names
  with open(tmp_path / "e" / "config.json") as f:
    assert os.path.isdir(json.load(f)["ae_path"])


def test_bin_checkpoints_read_without_pickled_code(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  sd = {**_llama_sd("model", 2, rng), "lm_head.weight": rng.normal(size=(V, D))}
  folder = tmp_path / "bin"
  folder.mkdir()
  torch.save({k: torch.tensor(v, dtype=torch.bfloat16) for k, v in sd.items()}, folder / "pytorch_model.bin")
  with open(folder / "config.json", "w") as f:
    json.dump(LLAMA_JSON, f)
  cfg, p = interop.import_transformer(str(folder))
  np.testing.assert_allclose(p["lm_head"]["kernel"], sd["lm_head.weight"].T, rtol=1e-2)
  # a pickle that is not a plain state dict is refused, not executed
  torch.save({"x": object()}, folder / "pytorch_model.bin")
  with pytest.raises(interop.InteropError, match="weights-only"):
    interop.import_transformer(str(folder))
