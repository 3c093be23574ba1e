"""Generation: temperature sampling (exact, two-stage, batch) and the cached decode loop."""
