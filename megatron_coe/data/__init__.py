"""Data: tokenizers, the built-in arithmetic word problems, jsonl -> indexed dataset, batches."""
