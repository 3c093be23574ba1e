"""The discrete baseline: Llama backbone + untied LM head (HF ``LlamaForCausalLM``).

Dimension legend: B batch, T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from calm_jax.configs import TransformerConfig, dtype_of
from calm_jax.models import layers
from calm_jax.models.backbone import Cache, LlamaModel
from calm_jax.parallel import sharding


class TransformerLM(nn.Module):
  """``__call__(tokens_BxT, positions_BxT=None, cache=None, valid_BxT=None) -> (logits_BxTxV fp32, cache)``."""
  cfg: TransformerConfig

  def setup(self):
    b = self.cfg.backbone
    self.model = LlamaModel(b)
    self.lm_head = layers.Dense(b.vocab_size, ("embed", "vocab"), std=b.initializer_range,
                                dtype=dtype_of(b.dtype), param_dtype=dtype_of(b.param_dtype))

  def __call__(self, tokens_BxT, positions_BxT=None, cache: Cache | None = None, valid_BxT=None):
    h, cache = self.model(self.model.embed(tokens_BxT), positions_BxT, cache, valid_BxT)
    logits = sharding.constrain(self.lm_head(h), ("batch", "length", "act_vocab"))
    return logits.astype(jnp.float32), cache

  def hidden_and_head(self, tokens_BxT):
    """``(h_BxTxD, W_DxV)``: the final hidden states and the LM head's kernel, both in the compute
    dtype (``__call__``'s logits are ``h @ W``), for the training loss, which projects only the
    positions it scores (in vocabulary blocks when V is large)."""
    h, _ = self.model(self.model.embed(tokens_BxT))
    dt = dtype_of(self.cfg.backbone.dtype)
    if self.is_initializing():
      self.lm_head(h[:, :1])
    return h.astype(dt), self.lm_head.variables["params"]["kernel"].astype(dt)
