"""How good a checkpoint is, measured the way its kind is used (`lmspec eval`): a language model's
cross-entropy and perplexity over windows of a text or of token shards, a classifier's accuracy and
confusion matrix on labelled texts, an instruction-tuned model's loss on the answers (and its answers).

A finetuned checkpoint records its data, split fractions, seed, balancing and limit, so by default it
is scored on the test split cut exactly as finetuning cut it. `settings` are the eval verb's options
(runtime/cli/eval.py) or any object with the same attributes.
"""
from __future__ import annotations

from pathlib import Path

from lmspec.runtime.errors import CheckpointError, DataError, UsageError
from lmspec.runtime.train.context import check_seq_fits


def checkpoint_kind(loaded) -> str:
    """"classifier", "instruct" or "language-model"; a CheckpointError for a model that is none."""
    from lmspec.runtime.finetune.classifier import classify_record

    if classify_record(loaded.checkpoint) is not None:
        return "classifier"
    if loaded.checkpoint.train_config.get("finetune") == "instruct":
        return "instruct"
    _, logits = loaded.graph.outputs[0]
    if len(logits.shape) != 3:
        raise CheckpointError(f"{loaded.checkpoint.path}: its output {list(logits.shape)} is not "
                              f"[batch, seq, vocab] logits, and it is not a finetuned classifier")
    return "language-model"


def finetuning_data(loaded, settings) -> tuple[str, str]:
    """(data path, split name): --data, else the data the checkpoint was finetuned on; --split,
    else its test split when the data is the finetuning's, else all of it."""
    recorded = loaded.checkpoint.train_config.get("data")
    data = settings.data or recorded
    if data is None:
        raise UsageError("--data is required: the checkpoint does not record the data it was finetuned on")
    same = recorded is not None and Path(data).resolve() == Path(recorded)
    split = settings.split or ("test" if same else "all")
    if split != "all" and "split" not in loaded.checkpoint.train_config:
        raise CheckpointError(f"{loaded.checkpoint.path}: records no split fractions; use --split all")
    return data, split


def language_model_scores(loaded, settings) -> dict:
    from lmspec.runtime.data.corpus import read_text_data
    from lmspec.runtime.data.token_data import TokenData
    from lmspec.runtime.data.tokenizer import TokenizerError, load_tokenizer
    from lmspec.runtime.train.perplexity import batched_windows, score_batches
    from lmspec.runtime.train.run import shard_data as _shard_data

    if settings.data is None:
        raise UsageError("--data is required for a language model: a text file, a directory of .txt files or "
                         "a shards directory")
    split = settings.split or "all"
    if split == "test":
        raise UsageError("--split test: a text or shards directory has train and validation parts only "
                         "(--split all, train or validation)")
    context = loaded.graph.context
    seq = settings.seq or context
    if seq is None:
        raise UsageError("--seq is required: the model has no context length")
    check_seq_fits(seq, loaded.graph)
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    shards = _shard_data(settings.data)
    if shards is not None:
        if shards.tokenizer().to_json() != tokenizer.to_json():
            raise DataError(f"{settings.data}: tokenized with another tokenizer than the checkpoint's")
        parts = {"train": [shards.train.shards], "validation": [shards.val.shards]}
    else:
        # the same 90/10 cut as `lmspec train`, so --split validation is the text training validated on
        try:
            ids = tokenizer.encode(read_text_data(settings.data))
        except TokenizerError as err:  # a character-level vocabulary that lacks one of the text's characters
            raise TokenizerError(f"{settings.data}: {err}") from None
        data = TokenData(ids)
        parts = {"all": [[ids]], "train": [[data.train.numpy()]], "validation": [[data.val.numpy()]]}
    streams = parts.get(split) or parts["train"] + parts["validation"]  # shards: the two splits in turn
    scored = score_batches(loaded.model, batched_windows(streams, seq, settings.batch, settings.max_tokens))
    if scored.tokens == 0:
        raise DataError(f"{settings.data}: the {split} part holds fewer than two tokens; nothing to score")
    return {"data": str(settings.data), "split": split, "seq": seq, "windows": scored.windows, "tokens": scored.tokens,
            "cross_entropy": scored.mean, "perplexity": scored.perplexity}


def classifier_scores(loaded, settings) -> dict:
    from lmspec.runtime.finetune.classifier import classifier_inputs
    from lmspec.runtime.finetune.classify_data import finetuning_splits, read_examples
    from lmspec.runtime.finetune.classify_train import Encoded, score_split

    labels, encoder = classifier_inputs(loaded)
    data, split = finetuning_data(loaded, settings)
    examples = read_examples(data, labels, settings.text_field, settings.label_field)
    if split != "all":
        cfg = loaded.checkpoint.train_config
        examples = finetuning_splits(examples, tuple(cfg["split"]), cfg["seed"], cfg.get("balance", False),
                                     cfg.get("limit"))[split]
        if not examples:
            raise DataError(f"{data}: the {split} split holds no texts")
    part = Encoded([encoder.encode(e.text) for e in examples], [e.label for e in examples])
    scored = score_split(loaded.model, part, len(labels), settings.batch, encoder.pad_id)
    return {"data": str(data), "split": split, "labels": labels, "rows": "true", "columns": "predicted",
            "count": scored["count"], "accuracy": scored["accuracy"], "matrix": scored["matrix"]}


def instruct_scores(loaded, settings) -> dict:
    from lmspec.runtime.data.tokenizer import load_tokenizer
    from lmspec.runtime.finetune.answers import write_responses
    from lmspec.runtime.finetune.instruct_data import (
        make_template, pad_id_for, read_records, split_records, tokenize_records
    )
    from lmspec.runtime.finetune.instruct_train import evaluate_examples

    cfg = loaded.checkpoint.train_config
    data, split = finetuning_data(loaded, settings)
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    template = make_template(cfg["template"], tokenizer)
    records = read_records(data)
    if cfg.get("limit"):
        records = records[:cfg["limit"]]
    if split == "all":
        chosen = list(range(len(records)))
    else:
        train, validation, test = split_records(range(len(records)), cfg["split"], cfg["train"]["seed"])
        chosen = {"train": train, "validation": validation, "test": test}[split]
    if not chosen:
        raise DataError(f"{data}: the {split} split holds no records")
    context = int(loaded.model.context)
    examples = tokenize_records(records, template, min(cfg.get("max_length") or context, context)).pick(chosen)
    loss = evaluate_examples(loaded.model, examples, settings.batch, pad_id_for(tokenizer)) if examples else None
    result = {"data": str(data), "split": split, "records": len(chosen), "scored": len(examples),
              "answer_tokens": sum(sum(e.trained[1:]) for e in examples), "loss": loss}
    if settings.responses:
        write_responses(loaded.model, tokenizer, [records[i] for i in chosen], template, settings.responses,
                        settings.response_tokens)
        result["responses"] = str(settings.responses)
    return result


SCORERS = {"language-model": language_model_scores, "classifier": classifier_scores, "instruct": instruct_scores}
