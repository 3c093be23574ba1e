"""calm_jax.hostmem: when the malloc settings apply, that the entry points re-execute once with
them, and that they do what they are for (a big buffer freed and allocated again by a worker
thread, as XLA:CPU does with a step's temporaries, stops page-faulting)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from calm_jax import hostmem

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc malloc settings")


def _cpu_env_without_settings() -> dict[str, str]:
  """This process's environment minus any malloc settings or mark, on the CPU platform."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("MALLOC_", "CALM_JAX_MALLOC", "GLIBC_TUNABLES"))}
  env["JAX_PLATFORMS"] = "cpu"
  return env


@glibc
def test_wanted_follows_platform_and_opt_out():
  assert hostmem.wanted({"JAX_PLATFORMS": "cpu"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cuda"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "tpu,cpu"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cpu", "CALM_JAX_MALLOC": "system"})
  assert not hostmem.wanted({"JAX_PLATFORMS": "cpu", "CALM_JAX_MALLOC": "tuned"})   # already re-executed


def test_tuned_environ_keeps_what_the_user_set():
  env = hostmem.tuned_environ({"MALLOC_MMAP_MAX_": "4", "PATH": "/x", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert env["MALLOC_MMAP_MAX_"] == "4" and env["PATH"] == "/x" and env["CALM_JAX_MALLOC"] == "tuned"
  assert env["MALLOC_ARENA_MAX"] == "1" and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert "GLIBC_TUNABLES" not in hostmem.tuned_environ({})


@glibc
def test_entry_point_reexecutes_once_with_the_settings(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      from calm_jax import hostmem
      print("start", os.environ.get("CALM_JAX_MALLOC"), flush=True)
      hostmem.reexec_with_tuned_malloc()
      print("main", sys.argv[1:], os.environ.get("MALLOC_ARENA_MAX"), os.environ.get("MALLOC_MMAP_MAX_"))
  """))
  env = _cpu_env_without_settings()
  out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == ["start None", "start tuned", "main ['--flag=1'] 1 0"], out
  env["CALM_JAX_MALLOC"] = "system"
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       check=True).stdout.splitlines()
  assert out == ["start system", "main [] None None"], out


_FAULTS = textwrap.dedent("""
    import ctypes, resource, threading
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, faults = 128 << 20, []
    def work():
      for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        libc.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=work)
    t.start(); t.join()
    print(min(faults[1:]))
""")


@glibc
def test_settings_stop_a_freed_step_buffer_from_faulting_in_again():
  env = _cpu_env_without_settings()

  def faults(e):
    return int(subprocess.run([sys.executable, "-c", _FAULTS], env=e, capture_output=True, text=True,
                              check=True).stdout)

  # glibc's defaults: a worker thread's 128 MB block is mmapped afresh at every reuse (32,768 faults
  # of 4 kB; ~64 where transparent huge pages are always on); tuned: it stays mapped (0).
  default, tuned = faults(env), faults(hostmem.tuned_environ(env))
  assert tuned <= 16, (tuned, default)
  assert default >= 48, (tuned, default)


@glibc
def test_shell_exports_for_scripts():
  env = _cpu_env_without_settings()
  cmd = f'eval "$("{sys.executable}" -m calm_jax.hostmem)"; echo "$MALLOC_MMAP_MAX_ $MALLOC_ARENA_MAX $CALM_JAX_MALLOC"'
  out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, check=True).stdout
  assert out.split() == ["0", "1", "tuned"], out
  env["CALM_JAX_MALLOC"] = "system"
  out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, check=True).stdout
  assert out.split() == ["system"], out
