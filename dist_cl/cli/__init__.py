"""The commands: training, making shards, extracting and evaluating embeddings, the multi-node drill."""
