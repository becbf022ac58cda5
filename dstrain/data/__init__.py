"""Training data: records and their validation (`records`), the per-file index (`index`), the streamed,
seekable corpus (`stream`), prompts, tokenised batches, pairs and packing, length grouping, the rank-split
loader (`loader`) and its prefetch thread, and a synthetic learnable task (`synthetic`). JSON array files are
streamed element by element (`json_array`); `convert/` turns upstream RAG pipelines' outputs into these formats."""
