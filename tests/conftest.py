"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's test time in LLVM optimisation
passes; the suite compiles many small programs once each, so it runs them
unoptimised.  Numerics are unchanged up to float reassociation (tests use
tolerances; the resume test compares two runs under the same flags).  Set
before JAX is imported; subprocesses started by tests inherit it.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
