"""Chat messages to a prompt: the model's own chat template, in Jinja, or for a model without one the
format its vocabulary's control tokens call for.

- A template recorded with the model (the one it was finetuned with, `alpaca` or `chatml` below, or the
  Jinja `chat_template` a Hugging Face import brought) renders as `transformers` renders it
  (runtime/data/chat_jinja.py): the same text for the same messages, then encoded as
  apply_chat_template(..., sanitize_control_tokens=True) encodes it. What ends the answer is what the
  template writes after an assistant's message: its first control token (`<|im_end|>`, `<|eot_id|>`,
  `<|endoftext|>`, ...) as a stop id, or else that text as a stop string; the `eos_token` stops too.
- Without one, ChatML when the vocabulary has `<|im_start|>` and `<|im_end|>` (as `lmspec tokenizer
  train` adds): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`;
  the answer ends at the `<|im_end|>` token.
- Otherwise plain text: `{Role}: {content}\\n` per message, then `Assistant:`; the answer ends where
  the model starts the user's next turn (`\\nUser:`).

Control tokens come only from the template: message text is encoded with special-token matching
switched off (a Jinja template's output is cut at the control tokens the messages held, which stay
their characters), so a message that contains `<|im_end|>` cannot close its turn and write the
assistant's or the system's. The plain-text format has no such defence: a message holding
"\\nAssistant:" reads like a turn, as it would to a person.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import tokenizers

from lmspec.runtime.data.chat_jinja import JinjaChat, control_pattern, literal_text, mark, split_marked
from lmspec.runtime.data.tokenizer import CharTokenizer, FileTokenizer, TokenizerError
from lmspec.runtime.errors import ChatError  # noqa: F401  (raised here, and imported from here)

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "developer", "user", "assistant", "tool")
PLAIN_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_STOP = "\nUser:"


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    stop: tuple[str, ...] = ()  # strings that end the assistant's answer
    stop_ids: tuple[int, ...] = ()  # token ids that end it


def check_messages(messages: object) -> list[tuple[str, str]]:
    """(role, text) pairs from OpenAI-style messages: content is a string, a list of text parts, or
    null (an assistant turn that only called tools)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content} objects")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        pairs.append((role, _content_text(content, f"messages[{i}].content")))
    return pairs


def _content_text(content: object, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatError(f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"{where} must be a string or a list of text parts")


def literal_encoder(tokenizer) -> Callable[[str], list[int]]:
    """encode(text) that never produces a special token: "<|im_end|>" in the text is encoded as its
    characters. A copy of the Hugging Face tokenizer is made for it, so the model's own tokenizer
    (which the generation thread uses) is left as it is."""
    if isinstance(tokenizer, FileTokenizer):
        literal = tokenizers.Tokenizer.from_str(tokenizer.tokenizer.to_str())
        literal.encode_special_tokens = True
        return lambda text: literal.encode(text, add_special_tokens=False).ids
    return tokenizer.encode  # a character vocabulary has no special tokens to match


class ChatMLTemplate:
    name = "chatml"

    def __init__(self, tokenizer, start_id: int, end_id: int):
        self.start_id, self.end_id = start_id, end_id
        self.encode = literal_encoder(tokenizer)

    def render(self, messages: Sequence[tuple[str, str]]) -> ChatPrompt:
        ids: list[int] = []
        newline = self.encode("\n")
        for i, (role, text) in enumerate(messages):
            ids += [self.start_id, *self.encode(role + "\n")]
            ids += _encode_content(self.encode, text, i)
            ids += [self.end_id, *newline]
        ids += [self.start_id, *self.encode("assistant\n")]
        return ChatPrompt(ids, stop_ids=(self.end_id,))


class PlainTemplate:
    name = "plain"

    def __init__(self, tokenizer):
        self.encode = literal_encoder(tokenizer)

    def render(self, messages: Sequence[tuple[str, str]]) -> ChatPrompt:
        ids: list[int] = []
        for i, (role, text) in enumerate(messages):
            ids += self._label(PLAIN_LABELS[role] + ": ")
            ids += _encode_content(self.encode, text, i)
            ids += self._label("\n")
        ids += self._label("Assistant:")
        return ChatPrompt(ids, stop=(PLAIN_STOP,))

    def _label(self, text: str) -> list[int]:
        try:
            return self.encode(text)
        except TokenizerError as err:  # a character vocabulary may lack a letter of "Assistant:"
            raise ChatError(f"this model's vocabulary cannot write the chat format's {text.strip()!r}: {err}") from None


def _encode_content(encode: Callable[[str], list[int]], text: str, index: int) -> list[int]:
    try:
        return encode(text)
    except TokenizerError as err:  # a character vocabulary cannot encode characters it never saw
        raise ChatError(f"messages[{index}].content: {err}") from None


# ------------------------------------------------------------------------------ Jinja templates

# The finetuning templates (runtime/finetune/instruct_data.py) in Jinja, so that every model's template
# is one text that travels with it. Alpaca renders each user turn as the book's instruction block, the
# system messages (joined by newlines) as its `### Input:`, the way finetuning reads a chat record, and
# an answer as `### Response:\n{answer}` and the end token (the text ALPACA_TEXT_END without one).
ALPACA_JINJA = r"""{%- set ns = namespace(input='') -%}
{%- for message in messages if message['role'] in ['system', 'developer'] -%}
    {%- set ns.input = ns.input ~ ('\n' if not loop.first else '') ~ message['content'] -%}
{%- endfor -%}
{%- for message in messages if message['role'] not in ['system', 'developer'] -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '### Response:\n' ~ message['content'] ~ (eos_token if eos_token is defined else '\n\n### Instruction:') -}}
    {%- else -%}
        {{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
            ~ '\n\n### Instruction:\n' ~ message['content'] ~ ('\n\n### Input:\n' ~ ns.input if ns.input else '')
            ~ '\n\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"""
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
BUILTIN_TEMPLATES = {"alpaca": ALPACA_JINJA, "chatml": CHATML_JINJA}
_SENTINELS = ("lmspec-answer-7f3e", "lmspec-next-7f3e")  # message texts that find where an answer ends


def special_tokens_of(tokenizer) -> dict[str, str]:
    """The special tokens a template sees for one of our tokenizers: its end-of-text token as `eos_token`."""
    if isinstance(tokenizer, FileTokenizer) and tokenizer.eot_id is not None:
        return {"eos_token": tokenizer.tokenizer.id_to_token(tokenizer.eot_id)}
    return {}


def builtin_chat_template(name: str, tokenizer) -> dict:
    """The record of a finetuning template (`alpaca`, `chatml`) for this tokenizer, as checkpoints and
    bundles keep it: {"source", "template", "special_tokens"}."""
    return {"source": name, "template": BUILTIN_TEMPLATES[name], "special_tokens": special_tokens_of(tokenizer)}


def template_record_problem(record: object) -> str | None:
    """What is wrong with a recorded template's shape, or None when it is usable."""
    if not isinstance(record, dict):
        return "not an object"
    if not isinstance(record.get("template"), str) or not record["template"].strip():
        return "'template' missing or not a non-empty string"
    tokens = record.get("special_tokens", {})
    if not (isinstance(tokens, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items())):
        return "'special_tokens' is not an object of strings"
    if not isinstance(record.get("source", ""), str):
        return "'source' is not a string"
    return None


def checkpoint_chat_template(train_config: Mapping, tokenizer) -> dict | None:
    """The chat template a checkpoint records: the one `finetune instruct` or `dpo` trained with, or
    that `import hf` brought (train_config["chat_template"]); for a checkpoint finetuned before
    templates were recorded, the builtin one its train_config names; None for any other."""
    record = train_config.get("chat_template")
    if record is not None and template_record_problem(record) is None:
        return record
    if train_config.get("template") in BUILTIN_TEMPLATES:
        return builtin_chat_template(train_config["template"], tokenizer)
    return None


class JinjaTemplate:
    """A recorded Jinja template over a tokenizer: `render` gives the prompt's ids, as transformers'
    apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True) gives them,
    with what ends the answer. A template that does not parse is reported by `render` (a ChatError:
    a 400 in the server, which keeps serving completions) and by `check`."""

    def __init__(self, tokenizer, record: Mapping):
        self.tokenizer, self.record = tokenizer, dict(record)
        self.name = record.get("source") or "jinja"
        self.special_tokens = dict(record.get("special_tokens") or {})
        self.error: ChatError | None = None
        try:
            self.chat = JinjaChat(record["template"], self.name)
        except ChatError as err:
            self.chat, self.error = None, err
        self.added: dict[str, int] = {}
        controls: list[str] = []
        if isinstance(tokenizer, FileTokenizer):
            added = tokenizer.tokenizer.get_added_tokens_decoder()
            self.added = {token.content: i for i, token in added.items()}
            literals = literal_text(record["template"]) if self.chat else ""
            controls = [t.content for t in added.values()
                        if t.special or (t.content in literals and not t.content.isspace())]
        self.controls = control_pattern(controls)
        self.literal = literal_encoder(tokenizer)
        self.stop, self.stop_ids = self._answer_end() if self.chat else ((), ())

    def check(self) -> None:
        """Raise the template's ChatError, if it does not parse."""
        if self.error is not None:
            raise self.error

    def text(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The rendered text, with marks around control tokens typed in messages (see chat_jinja.mark)."""
        self.check()
        dicts = [{"role": role, "content": mark(text, self.controls)} for role, text in messages]
        return self.chat.render(dicts, self.special_tokens, add_generation_prompt)

    def render(self, messages: Sequence[tuple[str, str]]) -> ChatPrompt:
        text = self.text(messages)
        return ChatPrompt(self._encode(text, messages), stop=self.stop, stop_ids=self.stop_ids)

    def _encode(self, text: str, messages: Sequence[tuple[str, str]]) -> list[int]:
        """transformers' encode_marked_chat: marked tokens as plain text, the rest as the tokenizer
        reads it; each piece after the first encoded after a newline that is then taken off."""
        if not isinstance(self.tokenizer, FileTokenizer):
            try:
                return self.tokenizer.encode(text)
            except TokenizerError as err:
                for i, (_, content) in enumerate(messages):
                    _encode_content(self.tokenizer.encode, content, i)  # names the message that cannot be written
                raise ChatError(f"this model's vocabulary cannot write its chat template's text: {err}") from None
        pieces = split_marked(text, self.added)
        encode = self.tokenizer.encode
        newline = encode("\n")
        ids = encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # odd pieces are the control tokens a message held
            piece_encode = self.literal if as_text else encode
            piece_ids = piece_encode("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else piece_encode(piece)
            if as_text and self.added.get(piece) in piece_ids:
                raise ChatError(f"cannot keep {piece!r} typed in a message as text: this tokenizer makes the "
                                f"control token of it")
            ids += piece_ids
        return ids

    def _answer_end(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(stop strings, stop ids): what the template writes after an assistant's message, up to the
        next message. Its first control token is the stop id; without one, that text is the stop string
        (Alpaca's for a character vocabulary, `\\nUser:` for a plain-text template)."""
        answer, following = _SENTINELS
        ends: list[str] = []
        for turns in ([("user", "Hi"), ("assistant", answer)],
                      [("user", "Hi"), ("assistant", answer), ("user", following)]):
            try:
                text = self.chat.render([{"role": r, "content": c} for r, c in turns], self.special_tokens,
                                        add_generation_prompt=False)
            except ChatError:
                continue
            if answer in text:
                after = text.split(answer, 1)[1]
                ends.append(after.split(following, 1)[0])
        stop_ids: list[int] = []
        stop: list[str] = []
        for end in ends:
            found = self.controls.search(end)
            if found and found.group(0) in self.added:
                stop_ids.append(self.added[found.group(0)])
                break
            if end.strip():
                stop.append(end.rstrip())
                break
        eos = self.added.get(self.special_tokens.get("eos_token", ""))
        if eos is not None and eos not in stop_ids and eos != self.tokenizer.eot_id:
            stop_ids.append(eos)  # generation stops at the tokenizer's end-of-text token anyway
        return tuple(stop), tuple(stop_ids)


def chat_template_for(tokenizer: CharTokenizer | FileTokenizer, recorded: Mapping | None = None
                      ) -> JinjaTemplate | PlainTemplate:
    """The model's own template when it records one (a bundle's sidecar or a checkpoint's
    "chat_template"); else ChatML when the vocabulary has its control tokens, the plain-text format
    otherwise."""
    if recorded is not None:
        return JinjaTemplate(tokenizer, recorded)
    if isinstance(tokenizer, FileTokenizer):
        start, end = (tokenizer.tokenizer.token_to_id(t) for t in (CHATML_START, CHATML_END))
        if start is not None and end is not None:
            return JinjaTemplate(tokenizer, builtin_chat_template("chatml", tokenizer))
    return PlainTemplate(tokenizer)
