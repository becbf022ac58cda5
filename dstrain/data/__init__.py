"""Training data: records and their validation (`records`), the per-file index (`index`), the streamed,
seekable corpus (`stream`), prompts, tokenised batches, pairs and packing, length grouping, the rank-split
loader (`loader`) and its prefetch thread, and a synthetic learnable task (`synthetic`)."""
