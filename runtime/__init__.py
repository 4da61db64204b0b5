"""Everything that runs a compiled model, in one subpackage per stage of the pipeline:

    data/         text in: corpora, cleaning and deduplication, tokenizers, token shards, chat templates
    distributed/  where a model runs: devices, torchrun's world, meshes, FSDP2, tensor and pipeline parallel
    checkpoint/   what a run saves and how it is read back: layout, single-process and sharded stores
    train/        the training loop, its loss, schedule, metrics, and sampling
    hf/           Hugging Face model directories in and out
    finetune/     from a checkpoint to a classifier, an instruction follower, a preference-tuned model; LoRA
    export/       ONNX bundles: writing, optimising, reading
    serve/        exported models behind HTTP, and the generation that serves them
    cli/          the `lmspec` command line: argparse and handlers that call the stages

Layers (lower may not import higher): errors <- atomic, checksum <- data, distributed <- checkpoint <- train, hf
<- finetune <- export <- serve <- cli; all of them may import lmspec.dsl and lmspec.compiler.
"""
