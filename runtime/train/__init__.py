"""Pretraining: the loop (loop.py) and its settings (config.py), how the model is laid out over the
ranks (placement.py), one step (steps.py), the loss (loss.py), the learning-rate schedule, what is
random and restored on resume (random_state.py), metrics and plots, hardware use (throughput.py),
perplexity for `lmspec eval`, and sampling with the KV cache. May import: errors, atomic, data,
distributed, checkpoint."""
