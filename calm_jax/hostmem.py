"""glibc malloc settings that keep XLA:CPU from page-faulting its working set in at every step.

XLA:CPU gives every execution of a compiled program one temporary buffer holding
all of its intermediates (125 MB for the tiny Transformer's train step, more
than a GB for the benchmark's medium autoencoder) and frees it when the step
ends.  glibc serves a request that large with a fresh ``mmap`` and unmaps it on
``free`` (from a worker thread's arena it must, above 64 MB), so every step
touches the whole buffer again through 4 kB page faults: 32,000 faults per step
of the tiny Transformer, 0.3-0.5 s of system time on the development VM, where
the step computes in ~0.1 s.  Reusing a freed 128 MB buffer from a thread
measured there: 54 ms (median 361 ms while the host was busy) with glibc's
defaults, 19 ms (42 ms) with :data:`SETTINGS`.

:data:`SETTINGS` ask glibc to back its large blocks with transparent huge pages
(``glibc.malloc.hugetlb=1``: 512 times fewer faults, the kernel's THP mode
permitting) and to keep blocks below 64 MB in the heap, mapped, once freed.  One
arena for all threads would avoid the faults altogether but serialises
multi-threaded host code (tokenising the corpus ran 2-5x slower), so it is not
used.  These are environment variables glibc reads when the process starts, so
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
    "MALLOC_MMAP_MAX_": "0",                  # blocks < 64 MB come from the heap ...
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # ... and stay mapped for the next step
}
TUNABLES = "glibc.malloc.hugetlb=1"           # larger blocks: madvise(MADV_HUGEPAGE)
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
  """``environ`` plus :data:`SETTINGS` and :data:`TUNABLES` (what the user set wins) and the mark."""
  env = dict(environ)
  for k, v in SETTINGS.items():
    env.setdefault(k, v)
  user = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" not in user:
    env["GLIBC_TUNABLES"] = f"{user}:{TUNABLES}" if user else TUNABLES
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
  names = (*SETTINGS, "GLIBC_TUNABLES", _MARK)
  return "\n".join(f"export {k}='{env[k]}'" for k in names)


if __name__ == "__main__":
  print(shell_exports())
