"""The train stage: the loop, optimisers, EMA, checkpoints, tracking, hub, webhooks, validation, multi-process launch."""
