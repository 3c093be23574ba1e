"""CALM: input compression + Llama backbone + a generative head (the reference's ``CALM`` subclasses).

Dimension legend: B batch, T tokens, K tokens per chunk, S = T/K chunks,
D width, L latent, E noise size, N model samples per position.

Data flow.  The model reads discrete tokens: chunk j's K token embeddings
(CALM's own D-wide embedding, not the autoencoder's) are concatenated and
compressed (Linear K*D -> 2D, SiLU, Linear 2D -> D, LayerNorm) into one input
vector; the Llama backbone turns the sequence of chunk vectors into hidden
states; the hidden state at chunk j predicts the latent of chunk j+1 through
the generative head.  In training the model reads chunks 0..S-2 and is scored
against the frozen autoencoder's posterior of chunks 1..S-1.

The head is chosen by ``cfg.head`` from :data:`calm_jax.models.heads.HEADS`
(energy, diffusion, flow); its parameters are ``params['generative_head']``
and everything the callers do with it -- losses, samples, cost -- goes
through :func:`calm_jax.models.heads.get`.  A head's sample is a pure function
of (hidden state, noise): the noise is drawn by the caller (``head.noise``) and
passed in, so the same noise always gives the same latent.
"""

from __future__ import annotations

import flax.linen as nn

from calm_jax.configs import EnergyConfig
from calm_jax.models import heads, layers
from calm_jax.models.backbone import Cache, LlamaModel
# The energy head's pieces, where they were before the heads got their own package.
from calm_jax.models.heads.energy import (  # noqa: F401
    ConcatDense, EnergyHead, MLPBlock, _kw, _ln, sample_noise)
from calm_jax.parallel import sharding


class EnergyModel(nn.Module):
  """Input compression + backbone + the generative head of ``cfg.head`` (any head, despite the name).

  Methods:
    ``hidden(tokens_BxT, positions_BxS=None, cache=None, valid_BxS=None)``
        -> ``(h_BxSxD, cache)``: one hidden state per chunk of the input.
    ``head(h, noise)`` -> latent (the energy head only, whose sample is one network
        call; for any head use ``heads.get(cfg).sample(params['generative_head'], h, noise)``).
    ``__call__(tokens_BxT, noise_NxBx(S-1)x...)``: one network call of the head on the
        hidden states of chunks 0..S-2 with ``noise`` as its random input (creates the
        parameters; for the energy head these are its latent predictions ``N x B x (S-1) x L``).
  """
  cfg: EnergyConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.backbone.hidden_size
    kw = _kw(cfg)
    self.transformer = LlamaModel(cfg.backbone)
    self.embed_proj_0 = layers.Dense(2 * d, ("patch", "mlp"), use_bias=True, **kw)
    self.embed_proj_2 = layers.Dense(d, ("mlp", "embed"), use_bias=True, **kw)
    self.embed_proj_3 = _ln(cfg)
    self.generative_head = heads.get(cfg).module()

  def compress(self, tokens_BxT):
    """K token embeddings per chunk -> one D vector per chunk."""
    b, t = tokens_BxT.shape
    k = self.cfg.patch_size
    e = self.transformer.embed(tokens_BxT).reshape(b, t // k, k * self.cfg.backbone.hidden_size)
    e = sharding.constrain(e, ("batch", "length", "patch"))
    return sharding.constrain(self.embed_proj_3(self.embed_proj_2(nn.silu(self.embed_proj_0(e)))),
                              ("batch", "length", "act_embed"))

  def hidden(self, tokens_BxT, positions_BxS=None, cache: Cache | None = None, valid_BxS=None):
    return self.transformer(self.compress(tokens_BxT), positions_BxS, cache, valid_BxS)

  def head(self, h, noise):
    if self.cfg.head != "energy":
      raise TypeError(f"EnergyModel.head: model.head={self.cfg.head!r} samples iteratively; use "
                      "calm_jax.models.heads.get(cfg).sample(params['generative_head'], h, noise)")
    return self.generative_head(h, noise)

  def __call__(self, tokens_BxT, noise_NxBxSxE):
    k = self.cfg.patch_size
    h_BxSxD, _ = self.hidden(tokens_BxT[:, :-k])
    return heads.get(self.cfg).init_call(self.generative_head, h_BxSxD[None], noise_NxBxSxE)
