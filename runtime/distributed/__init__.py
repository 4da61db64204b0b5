"""Where a model runs: the device a verb asks for, torchrun's world and process group, device meshes,
FSDP2, tensor and pipeline parallelism, the single-process view of their state, and materialising
a model built on `meta`. May import: errors, atomic, data, checkpoint's layout and store."""
