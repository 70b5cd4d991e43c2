"""The data stages: teacher generation, prompts, datasets and aspect buckets, the VAE/T5 cache and its loader."""
