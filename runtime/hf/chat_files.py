"""A model's chat template in a Hugging Face directory's tokenizer files: read as `transformers` reads
it on import, and written back on export so that AutoTokenizer.apply_chat_template renders the same.

transformers takes the template from `chat_template.jinja` when there is one, else from
tokenizer_config.json's `chat_template` (a string, or a list of named templates, of which "default"
is the one used without tools); `chat_template.json` holds a processor's, read here last. The
special tokens a template sees (`bos_token`, `eos_token`, ...) are tokenizer_config.json's, strings or
AddedToken objects, with special_tokens_map.json's taking their place in configs of the older form
(without `added_tokens_decoder`), as transformers merges them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

from lmspec.runtime.data.chat_jinja import SPECIAL_TOKEN_NAMES

CONFIG, JINJA, LEGACY_JSON, SPECIAL_MAP = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                                           "special_tokens_map.json")


def _json_object(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # a serialised AddedToken
        return value["content"]
    return None


def _default_template(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") if isinstance(named.get("default"), str) else None
    return None


def special_tokens_from_files(files: Mapping[str, str]) -> dict[str, str]:
    config = _json_object(files.get(CONFIG))
    tokens = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
    if "added_tokens_decoder" not in config:
        special_map = _json_object(files.get(SPECIAL_MAP))
        tokens |= {name: text for name in SPECIAL_TOKEN_NAMES
                   if (text := _token_text(special_map.get(name))) is not None}
    return tokens


def chat_template_from_files(files: Mapping[str, str]) -> dict | None:
    """The chat template record ({"source", "template", "special_tokens"}) of a directory's tokenizer
    files (name -> text), or None when they hold no template."""
    candidates = ((JINJA, files.get(JINJA)),
                  (CONFIG, _default_template(_json_object(files.get(CONFIG)).get("chat_template"))),
                  (LEGACY_JSON, _default_template(_json_object(files.get(LEGACY_JSON)).get("chat_template"))))
    for source, text in candidates:
        if isinstance(text, str) and text.strip():
            return {"source": source, "template": text, "special_tokens": special_tokens_from_files(files)}
    return None


def files_with_chat_template(files: dict[str, str], record: Mapping | None) -> dict[str, str]:
    """The tokenizer files to write for a model whose template is `record`: unchanged when they already
    give transformers that template and its special tokens; else tokenizer_config.json holds it (and
    the special tokens), and a chat_template.jinja that would take its place is left out."""
    if record is None:
        return files
    found = chat_template_from_files(files)
    wanted_tokens = dict(record.get("special_tokens") or {})
    if found is not None and found["template"] == record["template"] and \
            all(found["special_tokens"].get(k) == v for k, v in wanted_tokens.items()):
        return files
    files = {name: text for name, text in files.items() if name not in (JINJA, LEGACY_JSON)}
    config = _json_object(files.get(CONFIG))
    config["chat_template"] = record["template"]
    for name, text in wanted_tokens.items():
        if _token_text(config.get(name)) != text:
            config[name] = text
    if SPECIAL_MAP in files and "added_tokens_decoder" not in config:  # it would take their place: agree with it
        special_map = _json_object(files[SPECIAL_MAP])
        special_map.update({k: v for k, v in wanted_tokens.items() if _token_text(special_map.get(k)) != v})
        files[SPECIAL_MAP] = json.dumps(special_map, indent=2) + "\n"
    files[CONFIG] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files
