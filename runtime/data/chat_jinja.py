"""Jinja chat templates rendered exactly as Hugging Face `transformers` renders them in
`apply_chat_template`, so that a model's own template gives the same text here as there.

The environment is transformers' (utils/chat_template_utils.py): an ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; its `tojson` filter (no HTML escaping);
the globals `raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses underscore
names; and the variables `messages`, `tools`, `documents`, `add_generation_prompt` and the special
tokens of the tokenizer's config (`bos_token`, `eos_token`, ...). A template that does not parse,
or fails while rendering (`raise_exception`, an undefined name, a type error), is a ChatError naming
the template's source, never a traceback.

Control tokens typed inside a message are kept apart as transformers' `sanitize_control_tokens` does:
`mark` wraps each in private-use markers before rendering and `split_marked` cuts the rendered text at
them, so that the tokenizer can encode those as plain text and the template's own as control tokens.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache

from lmspec.runtime.errors import ChatError

# The special tokens transformers passes to a template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' markers around a control token typed in a message (chat_template_utils.mark_control_tokens)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


class _Dict:
    """`dict(...)` in a template, without the class itself (so no attribute access to its internals)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (a way into CPython's internals), as transformers does."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the underscore name {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = Namespace
    return env


@lru_cache(maxsize=32)
def _compiled(text: str):
    return _environment().from_string(text)


def literal_text(text: str) -> str:
    """The template's literal strings (its raw text and string constants) joined by NULs, as
    transformers collects them to find the added tokens a template writes (_get_template_literal_text)."""
    import jinja2.nodes

    ast = _environment().parse(text)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


class JinjaChat:
    """One compiled template and where it came from (for messages): `render` gives transformers' text."""

    def __init__(self, text: str, source: str | None = None):
        import jinja2

        self.text, self.source = text, source
        self.label = f"the chat template ({source})" if source else "the chat template"
        if not isinstance(text, str) or not text.strip():
            raise ChatError(f"{self.label} is empty")
        try:
            self.template = _compiled(text)
        except jinja2.TemplateSyntaxError as err:
            raise ChatError(f"{self.label} does not parse: line {err.lineno}: {err.message}") from None
        except jinja2.TemplateError as err:
            raise ChatError(f"{self.label} does not parse: {err}") from None

    def render(self, messages: list[dict], special_tokens: Mapping[str, str], add_generation_prompt: bool = True,
               **variables) -> str:
        """The text for `messages` ({role, content} dicts), as apply_chat_template(tokenize=False) gives it."""
        import jinja2

        context = {**special_tokens, **variables}
        try:
            return self.template.render(messages=messages, tools=context.pop("tools", None),
                                        documents=context.pop("documents", None),
                                        add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.SecurityError as err:
            raise ChatError(f"{self.label} did something unsafe: {err}") from None
        except jinja2.TemplateError as err:  # raise_exception(...), an undefined name or attribute
            raise ChatError(f"{self.label} refused these messages: {err}") from None
        except Exception as err:  # a type error and the like inside the template
            raise ChatError(f"{self.label} failed: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------- control tokens in messages

def control_pattern(tokens: Iterable[str]) -> re.Pattern:
    """A regex matching any of `tokens`, the longest first (a token before those it contains)."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")


def mark(text: str, controls: re.Pattern) -> str:
    """`text` with each control token in it wrapped in the markers; markers already in it are dropped
    first, so a message cannot forge one."""
    text = text.replace(MARK_START, "").replace(MARK_END, "")
    return controls.sub(f"{MARK_START}\\g<0>{MARK_END}", text)


def split_marked(rendered: str, tokens: Iterable[str]) -> list[str]:
    """The rendered text cut at the marks: [text, marked token, text, marked token, ..., text], a lone
    marker (a template's string method may separate a pair) leaving an empty token in its place."""
    pattern = control_pattern(tokens).pattern
    markers = re.compile(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
    return [piece or "" for piece in markers.split(rendered)]
