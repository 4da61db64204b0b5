"""Pretraining: the loop and its configuration, the loss, the learning-rate schedule, metrics and
plots, hardware use (MFU, memory), perplexity, and sampling with the KV cache. May import: errors,
atomic, data, distributed, checkpoint."""
