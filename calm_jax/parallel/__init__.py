"""Device meshes, the logical-axis rules table, and the per-device (shard_map) losses."""
