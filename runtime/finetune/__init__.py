"""From a checkpoint to a classifier, an instruction follower or a preference-tuned model, fully or
with LoRA: their data, loops and shared steps. May import: everything below it (train, hf, ...)."""
