"""glibc malloc settings that keep XLA:CPU from page-faulting its working set in at every step.

XLA:CPU gives every execution of a compiled program one temporary buffer holding
all of its intermediates (125 MB for the tiny Transformer's train step, more
than a GB for the benchmark's medium autoencoder) and frees it when the step
ends.  The step runs on a worker thread, whose malloc arena cannot hold a block
above 64 MB: glibc maps it fresh with ``mmap`` and unmaps it on ``free`` (the
thread arenas do so even with ``MALLOC_MMAP_MAX_=0``), so every step touches the
whole buffer again through 4 kB page faults: 32,768 per reuse of a 128 MB block.

:data:`SETTINGS` give all threads the one main arena (``MALLOC_ARENA_MAX=1``),
serve large blocks from its heap instead of ``mmap`` and never trim it, so a
freed step buffer stays mapped for the next step: no faults on reuse.  Measured
on a quiet 2-core AMD EPYC VM (2026-12-01, ``benchmarks/train_step.py``): the
medium CALM train step 5.79 s with glibc's defaults -> 4.35 s, the small
autoencoder step 0.71-0.91 -> 0.58 s.  The cost is lock contention in heavily
multi-threaded host code: tokenising the embedded corpus took 8.0 s instead of
3.7 s, which is why ``launch.prepare`` keeps the defaults.

Transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``) were the
earlier choice (512 times fewer faults on an Intel VM whose host was stalling
it) and are no longer set: on the EPYC VM they halved the autoencoder's speed
(0.58 -> 1.60 s per small step; its ``[N, 8192]`` fp32 logits have 32 kB rows,
and physically contiguous 2 MB pages map such rows onto the same cache sets).
A user's own ``GLIBC_TUNABLES`` is passed through untouched.

These are environment variables glibc reads when the process starts, so
:func:`reexec_with_tuned_malloc` restarts the entry point once with them set.
It applies only where XLA:CPU does the work (no GPU or TPU plugin installed, or
``JAX_PLATFORMS=cpu``) and only under glibc; ``CALM_JAX_MALLOC=system`` turns it
off.  A variable the user set already is left as it is.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",                  # every thread allocates from the main heap ...
    "MALLOC_MMAP_MAX_": "0",                  # ... large blocks included ...
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # ... and freed blocks stay mapped for the next step
}
_MARK = "CALM_JAX_MALLOC"
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin")


def _accelerator_installed() -> bool:
  return any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)


def wanted(environ=os.environ) -> bool:
  """Whether this process should run with :data:`SETTINGS`."""
  if environ.get(_MARK) in ("system", "tuned"):   # opted out, or already re-executed
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_installed()


def tuned_environ(environ=os.environ) -> dict[str, str]:
  """``environ`` plus :data:`SETTINGS` (what the user set wins) and the mark."""
  env = dict(environ)
  for k, v in SETTINGS.items():
    env.setdefault(k, v)
  env[_MARK] = "tuned"
  return env


def reexec_with_tuned_malloc() -> None:
  """Restart this Python command with :data:`SETTINGS` in its environment, when :func:`wanted`.

  Call it first thing in an entry point's ``__main__`` block, before threads or
  devices exist.  Returns (doing nothing) when the settings do not apply or are
  already in place; otherwise does not return.
  """
  if not wanted():
    return
  argv = getattr(sys, "orig_argv", None)
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], tuned_environ())


def shell_exports() -> str:
  """``export NAME=value`` lines of the tuned environment (empty where it does not apply), for
  shell scripts that start several Python processes (scripts/test.sh)."""
  if not wanted():
    return ""
  env = tuned_environ()
  names = (*SETTINGS, _MARK)
  return "\n".join(f"export {k}='{env[k]}'" for k in names)


if __name__ == "__main__":
  print(shell_exports())
