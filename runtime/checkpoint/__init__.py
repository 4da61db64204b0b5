"""What a run saves and how it is read back: the directory layout, the single-process store
(safetensors), the sharded store (torch.distributed.checkpoint), and models rebuilt from a checkpoint.
May import: errors, atomic, data, distributed."""
