"""Cost: parameter and FLOPs accounting, XLA cost cross-checks, the memory plan."""
