"""Standard normal draws at half the threefry cost of ``jax.random.normal``.

CALM's energy loss draws ``M = 100`` posterior samples of the latent per position
(``losses.posterior_samples``): at the benchmark's small size that is 6.5 M normals a step,
and generating their random bits was about a fifth of the whole CALM train step on the CPU.
``jax.random.normal`` under the (default) partitionable threefry spends one threefry2x32
block -- 20 rounds producing 64 bits -- on every 32-bit output and drops the other half.
:func:`normal` keeps both words of every block, so it makes the same number of normals from
half the blocks; the bits are the same counter-mode threefry2x32 stream, the conversion to a
normal is ``jax.random.normal``'s own (23-bit uniform on (-1, 1), ``sqrt(2) erfinv``).

The draws differ from ``jax.random.normal(key, shape)`` for the same key (another counter
layout), but are a pure function of ``key`` and ``shape``: resumed runs, sharded runs and
recorded draws (``benchmarks/train_dynamics.py`` records this function too) see the same
numbers.  The counters are elementwise in ``shape`` and the two halves are joined along one
chosen axis (``axis``; an unsharded one), so under ``jit`` shardings every device generates
only its part.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random


def _threefry_words(key):
  """The two uint32 words of a threefry key, or None for any other kind of key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return None
    data = jax.random.key_data(key)
  elif key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
    data = key
  else:
    return None
  if data.shape != (2,):
    return None
  return data[0], data[1]


def _counters(shape) -> jax.Array:
  """Row-major position of every element of ``shape`` as uint32, built from per-axis iotas."""
  ctr = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    ctr = ctr + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return ctr


def _bits_to_normal(bits, dtype):
  """``jax.random.normal``'s conversion: a 23-bit uniform on [nextafter(-1, 0), 1), then
  ``sqrt(2) * erfinv``."""
  one = jnp.float32(1.0)
  u01 = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - one
  lo = jnp.float32(np.nextafter(np.float32(-1.0), np.float32(0.0)))
  u = jnp.maximum(lo, u01 * (one - lo) + lo)
  return (jnp.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)).astype(dtype)


def normal(key, shape, dtype=jnp.float32, axis: int = 0) -> jax.Array:
  """``shape`` standard normals from ``key``; every threefry2x32 block gives two of them.

  Along ``axis`` the first half takes the blocks' first words and the second half their second
  words (an odd length is cut from one row more).  Pick an axis that is not sharded: the halves
  are joined along it.  Keys of another PRNG implementation fall back to ``jax.random.normal``.
  """
  shape = tuple(int(s) for s in shape)
  words = _threefry_words(key)
  if words is None or not shape or math.prod(shape) < 2:
    return jax.random.normal(key, shape, dtype)
  if math.prod(shape) // 2 >= 2**32:
    raise ValueError(f"rng.normal: {shape} needs more than 2^32 threefry blocks")
  axis = axis % len(shape)
  half = shape[:axis] + (-(-shape[axis] // 2),) + shape[axis + 1:]
  b0, b1 = jex_random.threefry2x32_p.bind(words[0], words[1], jnp.zeros(half, jnp.uint32), _counters(half))
  # Materialise both words once: fused into their consumers, XLA would recompute the whole
  # threefry block for each of the two outputs, which is the cost this module saves.
  b0, b1 = jax.lax.optimization_barrier((b0, b1))
  bits = jax.lax.slice_in_dim(jnp.concatenate([b0, b1], axis=axis), 0, shape[axis], axis=axis)
  return _bits_to_normal(bits, dtype)
