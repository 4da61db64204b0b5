"""What a run saves and how it is read back: the directory layout, the single-process store
(safetensors), the sharded store (torch.distributed.checkpoint), the checksums of every file written
(integrity.py), and models rebuilt from a checkpoint.
May import: errors, atomic, checksum, data, distributed."""
