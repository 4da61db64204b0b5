"""An instruction-tuned model's answers: decoded without the token or text that ends them, written
for judging beside the records they answer (`finetune instruct --responses`, `eval --responses`), and
which chat template a checkpoint is talked to with (`chat`)."""
from __future__ import annotations

import json
from pathlib import Path

RESPONSE_FIELD = "model_response"  # the book's key for generated answers (ch07)


def answer_text(tokenizer, template, new_ids: list[int]) -> str:
    """The decoded answer, without the end token or the end text that closed it."""
    if new_ids and new_ids[-1] == template.stop_id:
        new_ids = new_ids[:-1]
    text = tokenizer.decode(new_ids)
    return text.split(template.stop_text)[0] if template.stop_text else text


def write_responses(model, tokenizer, records: list[dict], template, path, max_tokens: int = 256) -> None:
    """Greedy answers to `records` as JSONL, each record with its answer under "model_response"
    (for `lmspec eval` and for judging, as the book does); the prompt is the one training used."""
    from lmspec.runtime.atomic import write_text_atomically
    from lmspec.runtime.train.sampling import generate

    lines = []
    for record in records:
        prompt = template.prompt_of(record)
        new = generate(model, prompt, max_tokens, temperature=0, eot_id=template.stop_id)
        lines.append(json.dumps(record | {RESPONSE_FIELD: answer_text(tokenizer, template, new)}) + "\n")
    write_text_atomically(Path(path), "".join(lines))


def chat_template_of(checkpoint, tokenizer) -> tuple[dict, bool]:
    """The chat template `chat` talks to a checkpoint in, and whether it is the checkpoint's own: the one
    it was finetuned with or imported with; for any other checkpoint ChatML when its vocabulary has the
    tokens, else Alpaca (False)."""
    from lmspec.runtime.data.chat_template import CHATML_END, builtin_chat_template, checkpoint_chat_template
    from lmspec.runtime.data.tokenizer import FileTokenizer

    record = checkpoint_chat_template(checkpoint.train_config, tokenizer)
    if record is not None:
        return record, True
    has_chatml = isinstance(tokenizer, FileTokenizer) and tokenizer.tokenizer.token_to_id(CHATML_END) is not None
    return builtin_chat_template("chatml" if has_chatml else "alpaca", tokenizer), False


def chat_answer(tokenizer, prompt, new_ids: list[int]) -> str:
    """A chat answer's text: without the token that ended it (`prompt.stop_ids` or end-of-text), cut
    before the first of `prompt.stop` strings."""
    if new_ids and (new_ids[-1] in prompt.stop_ids or new_ids[-1] == tokenizer.eot_id):
        new_ids = new_ids[:-1]
    text = tokenizer.decode(new_ids)
    for stop in prompt.stop:
        text = text.split(stop)[0]
    return text
