"""Chat messages to a prompt, in the format the tokenizer's control tokens call for.

- ChatML, when the vocabulary has `<|im_start|>` and `<|im_end|>` (as `lmspec tokenizer train` adds):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`; the
  answer ends at the `<|im_end|>` token.
- Otherwise plain text: `{Role}: {content}\\n` per message, then `Assistant:`; the answer ends where
  the model starts the user's next turn (`\\nUser:`).

Control tokens are put in by id, and message text is encoded with special-token matching switched
off, so a message that contains the characters `<|im_end|>` stays those characters: a user cannot
close their turn and write the assistant's or the system's. The plain-text format has no such
defence: a message holding "\\nAssistant:" reads like a turn, as it would to a person.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tokenizers

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


def chat_template_for(tokenizer: CharTokenizer | FileTokenizer) -> ChatMLTemplate | PlainTemplate:
    """ChatML when the vocabulary has its control tokens, the plain-text format otherwise."""
    if isinstance(tokenizer, FileTokenizer):
        start, end = (tokenizer.tokenizer.token_to_id(t) for t in (CHATML_START, CHATML_END))
        if start is not None and end is not None:
            return ChatMLTemplate(tokenizer, start, end)
    return PlainTemplate(tokenizer)
