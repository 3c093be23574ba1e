"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's test time compiling: in LLVM
optimisation passes and in the fusion emitters (2-10x the compile time of the
classic emitters on these small programs, measured on the evaluate tests'
programs).  The suite compiles many small programs once each, so it runs them
unoptimised, with the classic emitters.  Numerics are unchanged up to float reassociation (tests use
tolerances; the resume test compares two runs under the same flags).

Many tests (and the subprocesses some of them start: the resume test runs the
same training program three times) compile identical programs, so the suite
shares one persistent compilation cache, in a fresh temporary directory per
session unless ``JAX_COMPILATION_CACHE_DIR`` is already set.

Both are set before JAX is imported; subprocesses started by tests inherit them.
"""

import os
import tempfile

_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="calm_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
