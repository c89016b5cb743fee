"""Training data: MiniMind's JSONL formats, validation, tokenised shards, batching."""
