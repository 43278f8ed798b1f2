"""UltraFuser: token-level fusion of specialists that share a tokenizer (see docs/fusion.md)."""
