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

HEAD = dict(noise_size=64, num_samples=8, num_target_samples=100)
MODELS = ("autoencoder", "energy", "transformer")
# AdamW as the reference trains (CALM_NOTES §1.3): clipping at 1.0 included in the step.
OPTIM = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0)
