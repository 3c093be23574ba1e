"""The chunk autoencoder: K tokens <-> one continuous latent vector.

Dimension legend: B batch, S chunks, K tokens per chunk, N = B*S chunks
flattened, D width, L latent, V vocabulary.

Context-free by design (no attention; attention hurt downstream BrierLM in the
authors' ablation).  Encoder: embed each token; the first half of the layers
per token; flatten the K token states and squeeze them (Linear K*D -> D) into
one state; the second half of the layers; RMSNorm; Linear D -> 2L split into
mean and log-std (log sigma, not log sigma^2).  The decoder mirrors it and
projects onto the vocabulary with the encoder's embedding matrix (tied).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from calm_jax.configs import AutoencoderConfig, dtype_of
from calm_jax.models import layers, losses
from calm_jax.parallel import sharding


class AELayer(nn.Module):
  """``x + SwiGLU(RMSNorm(x))``: a residual MLP block without attention."""
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    x = sharding.constrain_rows(x)   # block boundary: rows (chunks or tokens) over the batch axes
    y = layers.RMSNorm(cfg.rms_norm_eps, dt, pdt, name="layernorm")(x)
    return x + layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range, dt, pdt,
                             name="mlp")(y)


def _kw(cfg):
  return dict(std=cfg.initializer_range, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


class Encoder(nn.Module):
  cfg: AutoencoderConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range,
                                     dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
    self.layers = [AELayer(cfg, name=f"layers_{i}") for i in range(cfg.num_encoder_layers)]
    self.squeeze = layers.Dense(cfg.hidden_size, ("patch", "embed"), use_bias=True, **_kw(cfg))
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))
    self.hidden_to_latent = layers.Dense(2 * cfg.latent_size, ("embed", "latent"), use_bias=True, **_kw(cfg))

  def __call__(self, ids_NxK):
    """Returns ``(mean_NxL, log_std_NxL)`` in the compute dtype."""
    cfg = self.cfg
    half = cfg.num_encoder_layers // 2
    h = sharding.constrain_rows(self.embed_tokens(ids_NxK))   # N x K x D
    for layer in self.layers[:half]:
      h = layer(h)
    h = self.squeeze(h.reshape(h.shape[0], -1))          # N x D
    for layer in self.layers[half:]:
      h = layer(h)
    out = sharding.constrain_rows(self.hidden_to_latent(self.norm(h)), "latent")   # N x 2L
    return out[..., :cfg.latent_size], out[..., cfg.latent_size:]


class Decoder(nn.Module):
  """Latent -> per-token hidden states (the tied vocabulary projection is the parent's)."""
  cfg: AutoencoderConfig

  def setup(self):
    cfg = self.cfg
    self.latent_to_hidden = layers.Dense(cfg.hidden_size, ("latent", "embed"), use_bias=True, **_kw(cfg))
    self.layers = [AELayer(cfg, name=f"layers_{i}") for i in range(cfg.num_decoder_layers)]
    self.expand = layers.Dense(cfg.patch_size * cfg.hidden_size, ("embed", "patch"), use_bias=True,
                               **_kw(cfg))
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype))

  def __call__(self, z_NxL):
    cfg = self.cfg
    half = cfg.num_decoder_layers // 2
    h = self.latent_to_hidden(z_NxL)                     # N x D
    for layer in self.layers[:half]:
      h = layer(h)
    h = self.expand(h).reshape(h.shape[0], cfg.patch_size, cfg.hidden_size)   # N x K x D
    for layer in self.layers[half:]:
      h = layer(h)
    return sharding.constrain_rows(self.norm(h))


class Autoencoder(nn.Module):
  """Encoder + decoder with the decoder's output matrix tied to the encoder's embedding.

  Methods (call through ``model.apply(params, ..., method=...)``):
    ``encode(tokens_BxT) -> (mean_BxSxL, log_std_BxSxL)``
    ``decode(z_BxSxL) -> logits_BxSxKxV`` (fp32)
    ``__call__(tokens_BxT, key=None, train=False)``: the variational forward
      used for training; returns a dict with ``logits`` (B x S x K x V, fp32),
      ``mean`` and ``log_std`` -- or, when the vocabulary is large enough to be
      projected in blocks (:func:`calm_jax.models.losses.vocab_block_size`),
      ``hidden`` and ``embedding`` (see ``decode_hidden``) in place of ``logits``.
    ``decode_argmax(z_BxSxL) -> tokens_BxSxK``: the argmax decode, blocked at large V.
  """
  cfg: AutoencoderConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, tokens_BxT):
    cfg = self.cfg
    b, t = tokens_BxT.shape
    s = t // cfg.patch_size
    mean, log_std = self.encoder(tokens_BxT.reshape(b * s, cfg.patch_size))
    return mean.reshape(b, s, -1), log_std.reshape(b, s, -1)

  def decode(self, z_BxSxL):
    lead = z_BxSxL.shape[:-1]
    h = self.decoder(z_BxSxL.reshape(-1, z_BxSxL.shape[-1]))
    logits = sharding.constrain_rows(self.encoder.embed_tokens.attend(h), "act_vocab").astype(jnp.float32)
    return logits.reshape(lead + logits.shape[-2:])

  def decode_hidden(self, z_BxSxL):
    """``(h_BxSxKxD, E_VxD)``: the decoder's output states and the tied projection, both in the
    compute dtype (``decode`` is ``h @ E^T``)."""
    lead = z_BxSxL.shape[:-1]
    h = self.decoder(z_BxSxL.reshape(-1, z_BxSxL.shape[-1]))
    h = h.astype(dtype_of(self.cfg.dtype)).reshape(lead + h.shape[-2:])
    return h, self.encoder.embed_tokens.embedding.astype(dtype_of(self.cfg.dtype))

  def decode_argmax(self, z_BxSxL):
    """``argmax(decode(z), -1)`` as int32 ``[..., K]``, in vocabulary blocks when V is large
    (the logits are not materialised; same tokens, the first maximum on ties)."""
    h, e = self.decode_hidden(z_BxSxL)
    return losses.projected_argmax(h, e)

  def __call__(self, tokens_BxT, key=None, train: bool = False):
    """Variational forward.

    ``key`` None: decode the posterior mean (deterministic reconstruction).
    With a key: z = mean + sigma * eps; when ``train`` also token dropout
    (dropped ids become 0, as the reference's ``input_ids * mask``) before the
    encoder and inverted dropout on z, both at rate ``ae_dropout``.
    """
    cfg = self.cfg
    if train and key is None:
      raise ValueError("Autoencoder: train=True needs a PRNG key")
    if key is not None:
      k_tok, k_eps, k_drop = jax.random.split(key, 3)
    inputs = tokens_BxT
    if train and cfg.ae_dropout > 0:
      keep = jax.random.uniform(k_tok, tokens_BxT.shape) > cfg.ae_dropout
      inputs = jnp.where(keep, tokens_BxT, 0)
    mean, log_std = self.encode(inputs)
    if key is None:
      z = mean
    else:
      z = mean + jnp.exp(log_std) * jax.random.normal(k_eps, mean.shape, mean.dtype)
      if train and cfg.ae_dropout > 0:
        keep = jax.random.bernoulli(k_drop, 1.0 - cfg.ae_dropout, z.shape)
        z = jnp.where(keep, z / (1.0 - cfg.ae_dropout), 0).astype(z.dtype)
    if losses.vocab_block_size(cfg.vocab_size, z.size // z.shape[-1] * cfg.patch_size):
      # Large V: no [tokens, V] logits; the loss projects in vocabulary blocks.
      h, e = self.decode_hidden(z)
      return {"hidden": h, "embedding": e, "mean": mean, "log_std": log_std}
    return {"logits": self.decode(z), "mean": mean, "log_std": log_std}

  def init_all(self, tokens_BxT):
    """For ``init``: touches every parameter."""
    return self(tokens_BxT)
