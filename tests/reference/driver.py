"""Runs the authors' PyTorch models (github shaochenze/calm) for the parity tests.

Invoked by ``tests/test_reference_parity.py`` in a subprocess, under a Python
that has torch and transformers (``CALM_REFERENCE_PYTHON``), with the
reference checkout at ``CALM_REFERENCE_DIR``.  Nothing here is the
reference's code: this script only builds its classes, saves and loads them,
and records their outputs on fixed inputs into ``outputs.npz``.

  driver.py create OUT   random reference models (every tensor perturbed so
                         that zero-initialised layers and unit norms are
                         exercised), saved with save_pretrained under OUT/{ae,
                         energy, llama}, plus their outputs.
  driver.py load OUT     loads OUT/{ae, energy, llama} with from_pretrained
                         (folders written by calm_jax's exporter) and records
                         the same outputs.
Inputs come from OUT/inputs.npz, written by the test.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.environ["CALM_REFERENCE_DIR"])

from models.configuration_autoencoder import AutoencoderConfig  # noqa: E402
from models.configuration_calm import CALMConfig  # noqa: E402
from models.modeling_autoencoder import Autoencoder  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

V, K, L = 97, 4, 16


def _perturb(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not name.startswith("ae_model."):   # the frozen autoencoder stays as loaded
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def create(out):
  torch.manual_seed(0)
  ae = Autoencoder(AutoencoderConfig(vocab_size=V, hidden_size=48, intermediate_size=80, latent_size=L,
                                     patch_size=K, num_encoder_layers=2, num_decoder_layers=2))
  _perturb(ae, 1)
  # As the authors' train_autoencoder.sh (--save_safetensors False): a .bin keeps the tied
  # decoder.lm_head_weight; a safetensors save drops it and from_pretrained then leaves
  # that matrix uninitialised (transformers 4.43).
  ae.save_pretrained(f"{out}/ae", safe_serialization=False)
  cfg = CALMConfig(ae_path=f"{out}/ae", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, latent_size=L, patch_size=K, noise_size=8,
                   num_mlp_layers=2, num_samples=8, max_position_embeddings=64)
  energy = EnergyTransformer(cfg)
  _perturb(energy, 2)
  energy.save_pretrained(f"{out}/energy", safe_serialization=False)
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rms_norm_eps=1e-6, tie_word_embeddings=False))
  _perturb(llama, 3)
  llama.save_pretrained(f"{out}/llama")
  return ae, energy, llama


def load(out):
  ae = Autoencoder.from_pretrained(f"{out}/ae")
  energy = EnergyTransformer.from_pretrained(f"{out}/energy")
  llama = LlamaForCausalLM.from_pretrained(f"{out}/llama")
  return ae, energy, llama


def head_with_noise(head, h, noise):
  """The head's ``sample`` with the noise given instead of drawn."""
  x = head.norm_noise(head.noise_embd(noise))
  y = head.norm_hidden(head.hidden_embd(h))
  for block in head.mlp_blocks:
    x = block(x, y)
  return head.final_layer(x)


@torch.no_grad()
def outputs(ae, energy, llama, inp):
  for m in (ae, energy, llama):
    m.eval()
    m.float()
  t = lambda k: torch.from_numpy(inp[k])
  out = {}
  ids = t("ae_tokens")                                     # B x T
  lat = ae.encoder(input_ids=ids.reshape(-1, K))           # (B*S) x 1 x 2L
  mean, log_std = torch.chunk(lat, 2, dim=-1)
  out["ae_mean"], out["ae_log_std"] = mean[:, 0].numpy(), log_std[:, 0].numpy()
  out["ae_logits"] = ae.decoder(latent_states=t("ae_z")[:, None, :]).numpy()   # N x K x V
  ids = t("lm_tokens")
  b, s = ids.shape[0], ids.shape[1] // K
  emb = energy.embed_proj(energy.transformer.embed_tokens(ids).reshape(b, s, -1))
  h = energy.transformer(inputs_embeds=emb)[0]
  out["energy_hidden"] = h.numpy()
  out["energy_head"] = head_with_noise(energy.generative_head, h, t("noise")).numpy()
  x = t("x_samples")                                        # N x P x L
  torch.manual_seed(1234)
  out["energy_score"] = energy.energy_score(x, t("y_mean"), t("y_log_std")).numpy()
  torch.manual_seed(1234)                                   # the same draw energy_score made
  eps = torch.randn((100, *t("y_mean").shape))
  out["y_samples"] = (t("y_mean") + eps * torch.exp(t("y_log_std"))).numpy()
  out["llama_logits"] = llama(input_ids=ids).logits.numpy()
  return out


if __name__ == "__main__":
  mode, out = sys.argv[1], sys.argv[2]
  inp = dict(np.load(f"{out}/inputs.npz"))
  models = create(out) if mode == "create" else load(out)
  np.savez(f"{out}/outputs.npz", **outputs(*models, inp))
  print("ok", mode)
