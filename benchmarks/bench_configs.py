"""The fixed benchmark configurations, shared by calm_jax's and the reference's benchmark scripts.

Plain Python (no jax, no torch) so that both interpreters import it.  CPU-sized:
``small`` is d = 256, ``medium`` d = 512 (the paper's autoencoder width);
vocabulary 8192, K = 4, latent 128, the reference's head (N = 8 model samples,
M = 100 target samples, head blocks = layers / 4).
"""

VOCAB = 8192
PATCH = 4
LATENT = 128

SIZES = {
    "small": {
        "ae": dict(hidden_size=256, intermediate_size=640),
        "backbone": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4),
        "num_mlp_layers": 1,
        "batch": 8, "seq": 256,          # 2048 tokens per step
    },
    "medium": {
        "ae": dict(hidden_size=512, intermediate_size=1280),
        "backbone": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8),
        "num_mlp_layers": 2,
        "batch": 8, "seq": 512,          # 4096 tokens per step
    },
}

# GPU sizes (benchmarks/gpu.sh), Llama-3's vocabulary, 8 x 2048 tokens: ``gpu_m`` is the paper's
# autoencoder (d 512) and CALM-M (16 layers, d 1024, ff 2752, 16 heads, 4 head blocks; CALM_NOTES
# §2), ``gpu_s`` Transformer-S (12 layers, d 768, ff 2048, 16 heads).  ``dry_m`` / ``dry_s``: the same
# shapes shrunk for a CPU dry run of the script (``gpu.sh --dry-run``).
SIZES.update({
    "gpu_m": {
        "vocab": 128257,
        "ae": dict(hidden_size=512, intermediate_size=1280),
        "backbone": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16),
        "num_mlp_layers": 4,
        "batch": 8, "seq": 2048,
    },
    "gpu_s": {
        "vocab": 128257,
        "ae": dict(hidden_size=512, intermediate_size=1280),
        "backbone": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16),
        "num_mlp_layers": 3,
        "batch": 8, "seq": 2048,
    },
    "dry_m": {
        "vocab": 40000,
        "ae": dict(hidden_size=64, intermediate_size=128),
        "backbone": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4),
        "num_mlp_layers": 1,
        "batch": 2, "seq": 256,
    },
    "dry_s": {
        "vocab": 40000,
        "ae": dict(hidden_size=64, intermediate_size=128),
        "backbone": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4),
        "num_mlp_layers": 1,
        "batch": 2, "seq": 256,
    },
})


def vocab(size: str) -> int:
  """The vocabulary of a size (VOCAB unless the size names its own)."""
  return SIZES[size].get("vocab", VOCAB)


HEAD = dict(noise_size=64, num_samples=8, num_target_samples=100)
MODELS = ("autoencoder", "energy", "transformer")
# AdamW as the reference trains (CALM_NOTES §1.3): clipping at 1.0 included in the step.
OPTIM = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)
