"""The latent cache: VAE latents and T5 embeddings of every usable clip (`build`), the shard files that hold them
(`shards`), and what training reads from them (`loader`). Training imports `loader` and `shards`, never `build`.

Layout of `cache.output_dir` (the names are in `dmd.data.schema`):

    index.parquet          one row per usable sample of the current sources (INDEX_COLUMNS)
    problems.parquet       every file left out: dataset, path, kind, reason, source_sha256, deleted
    meta.json              model identities, latent geometry, max_sequence_length, bucket pruning
    summary.json           what the cache holds: sources, samples, problems by kind, buckets (a run's own counts
                           and timings go to the log and the flow's result, so equal inputs give equal bytes)
    latents/<dataset>/     shard-<hash>.safetensors + shard-<hash>.parquet (its rows); per-dataset cache_dir
    text/                  negative.safetensors, empty.safetensors (key prompt_embeds, (1,L,D)), text shards
"""
