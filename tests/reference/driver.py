"""Runs the authors' PyTorch models (github shaochenze/calm) for the parity tests.

Invoked by ``tests/test_reference_parity.py`` in a subprocess, under a Python
that has torch and transformers (``CALM_REFERENCE_PYTHON``), with the
reference checkout at ``CALM_REFERENCE_DIR``.  Nothing here is the
reference's code: this script only builds its classes, saves and loads them,
and records their outputs on fixed inputs into ``outputs.npz``.

  driver.py create OUT   random reference models (every tensor perturbed so
                         that zero-initialised layers and unit norms are
                         exercised), saved with save_pretrained under OUT/{ae,
                         energy, diffusion, flow, llama}, plus their outputs.
  driver.py load OUT     loads OUT/{ae, energy, diffusion, flow, llama} with
                         from_pretrained (folders written by calm_jax's exporter)
                         and records the same outputs.
Inputs come from OUT/inputs.npz, written by the test.

The diffusion and flow heads draw their randomness inside the reference's code
(``torch.randn``, ``randint``, ``rand``, ``randn_like``); :func:`injected` replaces
those functions, for the duration of one call, by ones that return the test's
arrays in order, and makes ``Tensor.cuda`` the identity (the samplers hard-code
it).  The reference's ``DiffusionTransformer``/``FlowTransformer`` read a
``num_samples`` attribute that only ``EnergyTransformer`` sets; it is set here
from the config.  Nothing in /work/ref is modified.
"""

import contextlib

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.environ["CALM_REFERENCE_DIR"])

from models.configuration_autoencoder import AutoencoderConfig  # noqa: E402
from models.configuration_calm import CALMConfig  # noqa: E402
from models.modeling_autoencoder import Autoencoder  # noqa: E402
from models.modeling_diffusion import DiffusionTransformer  # noqa: E402
from models.modeling_energy import EnergyTransformer  # noqa: E402
from models.modeling_flow import FlowTransformer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

V, K, L = 97, 4, 16
HEAD_CLASSES = {"diffusion": DiffusionTransformer, "flow": FlowTransformer}


@contextlib.contextmanager
def injected(**queues):
  """torch.<name>(...) returns the next array of ``queues[name]`` (shape-checked) inside the block."""
  saved = {name: getattr(torch, name) for name in queues}
  saved_cuda = torch.Tensor.cuda

  def fake(name):
    def f(*args, **kwargs):
      q = queues[name]
      if not q:
        raise AssertionError(f"torch.{name} called more often than the test injected")
      x = torch.from_numpy(np.ascontiguousarray(q.pop(0)))
      shape = args[0].shape if name.endswith("_like") else (
          tuple(args[-1]) if name == "randint" else tuple(args[0]) if isinstance(args[0], (tuple, list))
          else tuple(args))
      assert tuple(x.shape) == tuple(shape), (name, tuple(x.shape), shape)
      return x
    return f

  for name in queues:
    setattr(torch, name, fake(name))
  torch.Tensor.cuda = lambda self, *a, **k: self
  try:
    yield
    left = {n: len(q) for n, q in queues.items() if q}
    assert not left, f"injected draws left unused: {left}"
  finally:
    for name, fn in saved.items():
      setattr(torch, name, fn)
    torch.Tensor.cuda = saved_cuda


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
  others = {}
  for i, (name, cls) in enumerate(HEAD_CLASSES.items()):
    m = cls(cfg)
    _perturb(m, 4 + i)
    m.save_pretrained(f"{out}/{name}", safe_serialization=False)
    others[name] = m
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rms_norm_eps=1e-6, tie_word_embeddings=False))
  _perturb(llama, 3)
  llama.save_pretrained(f"{out}/llama")
  return ae, energy, llama, others


def load(out):
  ae = Autoencoder.from_pretrained(f"{out}/ae")
  energy = EnergyTransformer.from_pretrained(f"{out}/energy")
  llama = LlamaForCausalLM.from_pretrained(f"{out}/llama")
  others = {name: cls.from_pretrained(f"{out}/{name}") for name, cls in HEAD_CLASSES.items()}
  return ae, energy, llama, others


def diffusion_tables(head):
  """The training and the respaced (sampling) processes' float64 tables."""
  out = {}
  for tag, d in (("train", head.train_diffusion), ("gen", head.gen_diffusion)):
    for f in ("betas", "alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef1",
              "posterior_mean_coef2", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
      out[f"tab_{tag}_{f}"] = np.asarray(getattr(d, f), np.float64)
    out[f"tab_{tag}_map"] = np.asarray(d.timestep_map, np.int64)
  return out


def head_outputs(name, model, inp):
  """Network, training losses (with the gradient that shows the detached mean), samplers and the whole
  model's loss of a diffusion or flow model, every draw injected."""
  t = lambda k: torch.from_numpy(inp[k])
  head = model.generative_head
  out = {}
  c = t("net_c")
  if name == "diffusion":
    out.update(diffusion_tables(head))
    out["diffusion_net"] = head.net(t("net_x"), t("net_t_int"), c).detach().numpy()
    for p in head.parameters():
      p.grad = None
    terms = head.train_diffusion.training_losses(head.net, t("dl_target"), t("net_t_int"), dict(c=c),
                                                 noise=t("dl_noise"))
    terms["loss"].sum().backward()
    out["diffusion_mse"], out["diffusion_vb"] = terms["mse"].detach().numpy(), terms["vb"].detach().numpy()
    out["diffusion_loss"] = terms["loss"].detach().numpy()
    out["diffusion_grad_out"] = head.net.final_layer.linear.weight.grad.numpy().copy()
    noise = inp["ds_noise"]                                   # samples x R x L: x_T, then the step noises
    steps = [noise[:, k] for k in range(1, noise.shape[1])] + [np.zeros_like(noise[:, 0])]
    with torch.no_grad(), injected(randn=[noise[:, 0]], randn_like=steps):
      out["diffusion_sample"] = head.sample(t("ds_c")).numpy()
  else:
    out["flow_net"] = head.net(t("net_x"), t("net_t_flow"), c).detach().numpy()
    with injected(rand=[inp["net_t_flow"]], randn_like=[inp["fl_x0"]]):
      loss = head(target=t("fl_target"), z=c)
    out["flow_loss"] = loss.detach().numpy()
    for solver in ("midpoint", "euler"):
      head.solver = solver
      with torch.no_grad(), injected(randn=[inp["fs_noise"]]):
        out[f"flow_sample_{solver}"] = head.sample(t("ds_c")).numpy()
    head.solver = "midpoint"
  # The whole model's training loss (labels = inputs: every position counts), every draw injected.
  # The reference reads an attribute only EnergyTransformer sets.
  model.num_samples = model.config.num_samples
  model.train()
  model.ae_model.eval()
  ids = t("lm_tokens")
  queues = dict(randn=[inp["m_eps"]], randn_like=[inp["m_noise"]])
  queues.update(randint=[inp["m_t_int"]]) if name == "diffusion" else queues.update(rand=[inp["m_t_flow"]])
  with torch.no_grad(), injected(**queues):
    out[f"{name}_model_loss"] = model(input_ids=ids, labels=ids).loss.numpy()
  model.eval()
  return out


def head_with_noise(head, h, noise):
  """The head's ``sample`` with the noise given instead of drawn."""
  x = head.norm_noise(head.noise_embd(noise))
  y = head.norm_hidden(head.hidden_embd(h))
  for block in head.mlp_blocks:
    x = block(x, y)
  return head.final_layer(x)


@torch.no_grad()
def outputs(ae, energy, llama, others, inp):
  for m in (ae, energy, llama, *others.values()):
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
  with torch.enable_grad():
    for name, m in others.items():
      out.update(head_outputs(name, m, inp))
  return out


if __name__ == "__main__":
  mode, out = sys.argv[1], sys.argv[2]
  inp = dict(np.load(f"{out}/inputs.npz"))
  models = create(out) if mode == "create" else load(out)
  np.savez(f"{out}/outputs.npz", **outputs(*models, inp))
  print("ok", mode)
