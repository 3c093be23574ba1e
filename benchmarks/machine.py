"""How much of the CPU a benchmark actually got: a probe printed beside every recorded number.

On shared virtual machines the process can be descheduled by the host for hundreds of
milliseconds at a time, without the guest's load average or steal time showing it (seen on
the development VM: 0.3-0.7 s stalls, 2-3 per second, 80% of the wall time).  Numbers taken
then are meaningless, so the benchmarks print this probe's result with their tables.
"""

from __future__ import annotations

import time

import numpy as np


def stall_fraction(seconds: float = 2.0, threshold_ms: float = 20.0) -> float:
  """Share of ``seconds`` of wall time spent in gaps longer than ``threshold_ms`` between
  back-to-back ~1 ms pieces of single-threaded work (0: the CPU was ours the whole time)."""
  a = np.ones((256, 256), np.float32)
  out = np.empty_like(a)
  stalled, start = 0.0, time.perf_counter()
  last = start
  while last - start < seconds:
    for _ in range(8):
      np.matmul(a, a, out=out)
    now = time.perf_counter()
    if now - last > threshold_ms / 1e3:
      stalled += now - last
    last = now
  return stalled / (last - start)


def describe(seconds: float = 2.0) -> str:
  f = stall_fraction(seconds)
  verdict = "quiet" if f < 0.05 else "NOT QUIET: timings are unreliable"
  return f"CPU stall probe: {100 * f:.0f}% of {seconds:.0f} s stalled ({verdict})"


if __name__ == "__main__":
  print(describe(5.0))
