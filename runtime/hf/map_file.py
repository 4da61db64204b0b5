"""A Hugging Face family as a TOML map: how config.json's keys give a spec's hyper-parameters and how
the checkpoint's tensor names give the spec's parameters. `lmspec import hf --map` and `export hf
--map` read one; the families lmspec ships are maps too (runtime/hf/maps/*.toml). The README's
"Bringing a new family" section is the reference, with a worked example.

    [family]
    name = "smollm3"
    model_types = ["smollm3"]                  # config.json model_type values; the first is export's
    ignore = ['rotary_emb\\.inv_freq$']          # regexes of tensors that hold no parameter
    aliases = [["transformer.", ""]]           # prefixes also accepted on import
    tie = { head = "lm_head.weight", key = "tie_word_embeddings", default = true }

    [hyper]                                    # spec hyper-parameter = config.json key(s)
    vocab = "vocab_size"
    kv_heads = { keys = ["num_key_value_heads"], default = "num_attention_heads" }
    window = { keys = ["sliding_window"], when = { keys = ["use_sliding_window"], value = true }, needed = true }

    [[requires]]                               # config values the spec assumes
    keys = ["hidden_act"]
    allowed = ["silu"]

    [[op_args]]                                # an op argument a config value must agree with
    op = "rmsnorm"
    arg = "eps"
    keys = ["rms_norm_eps"]

    [params]                                   # spec parameter = checkpoint tensor; {i} is the layer
    "embed.weight" = "model.embed_tokens.weight"
    "block.{i}.attn.proj.weight" = "model.layers.{i}.self_attn.o_proj.weight"
    "block.{i}.attn.qkv.weight" = { cat = ["...q_proj.weight", "...k_proj.weight", "...v_proj.weight"],
                                    parts = ["heads", "kv_heads", "kv_heads"] }
    "block.{i}.mlp.fc.weight" = { transpose = "...c_fc.weight" }
    "block.{i}.mlp.fc_weight" = { stack = { cat = [...] }, fused = "...experts.gate_up_proj" }

    [export.smollm3]                           # what `export hf` writes besides the hyper-parameters
    architecture = "SmolLM3ForCausalLM"
    config = { rope_scaling = {} }
    null = ["sliding_window"]                  # keys written as null (TOML has no null)

    [templates]                                # `import hf --emit-spec` specs, by model_type[/rope_type]
    smollm3 = '''model {name} { ... }'''

Every mistake is a MapError naming the file and the line of the key.
"""
from __future__ import annotations

import ast as python_ast
import re
import tomllib
from pathlib import Path

from lmspec.runtime.errors import UsageError
from lmspec.runtime.hf.families import Cat, Family, Hyper, OpArg, Require, Stack, T, When

SECTIONS = ("family", "hyper", "requires", "op_args", "params", "export", "templates")


class MapError(UsageError):
    """A map file that cannot be read as a family."""


def load_map(path: str | Path) -> Family:
    """The family a map file describes."""
    return read_map(path)[1]


def read_map(path: str | Path) -> tuple[str, Family]:
    """A map file's text (what an import records, for `export hf`) and the family it describes."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise MapError(f"{path}: cannot read the map: {err.strerror or err}") from None
    return text, parse_map(text, str(path))


def parse_map(text: str, where: str) -> Family:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(err))
        at = f"{where}:{found.group(1)}:{found.group(2)}" if found else where
        raise MapError(f"{at}: not TOML: {str(err).split(' (at line')[0]}") from None
    return _Reader(text, where).family(data)


class _Reader:
    """Reads the parsed TOML into the family's tables; every complaint names the key's line."""

    def __init__(self, text: str, where: str):
        self.lines, self.where = text.splitlines(), where

    def fail(self, key: str, message: str):
        raise MapError(f"{self.where}:{self._line_of(key)}: {message}")

    def _line_of(self, key: str) -> int:
        """The first line that defines `key` (a bare or quoted TOML key, or a [table] header)."""
        last = key.split(".")[-1]
        patterns = [rf'^\s*\[+\s*{re.escape(key)}\s*\]+', rf'^\s*"{re.escape(last)}"\s*=', rf"^\s*{re.escape(last)}\s*=",
                    rf'[{{,]\s*"?{re.escape(last)}"?\s*=']
        for pattern in patterns:
            for number, line in enumerate(self.lines, 1):
                if re.search(pattern, line):
                    return number
        return 1

    # ---- the sections ---------------------------------------------------------------------

    def family(self, data: dict) -> Family:
        self.known(data, SECTIONS, "")
        head = self.table(data, "family", required=True)
        self.known(head, ("name", "model_types", "ignore", "aliases", "tie"), "family")
        name = self.string(head, "name", "family.name", required=True)
        model_types = self.strings(head, "model_types", "family.model_types", required=True)
        ignore = self.strings(head, "ignore", "family.ignore")
        for pattern in ignore:
            try:
                re.compile(pattern)
            except re.error as err:
                self.fail("ignore", f"family.ignore: {pattern!r} is not a regular expression: {err}")
        aliases = head.get("aliases", [])
        if not isinstance(aliases, list) or not all(
                isinstance(a, list) and len(a) == 2 and all(isinstance(s, str) for s in a) for a in aliases):
            self.fail("aliases", "family.aliases must be a list of [prefix, replacement] pairs of strings")
        tie = head.get("tie", {"head": "lm_head.weight", "key": "tie_word_embeddings", "default": False})
        if not isinstance(tie, dict) or set(tie) - {"head", "key", "default"} or \
                not isinstance(tie.get("head"), str) or not isinstance(tie.get("key"), str):
            self.fail("tie", 'family.tie must be { head = "lm_head.weight", key = "tie_word_embeddings", '
                             "default = false }")
        exports = self.table(data, "export")
        for model_type, entry in exports.items():
            if model_type not in model_types:
                self.fail(f"export.{model_type}", f"export.{model_type}: {model_type!r} is not one of "
                                                  f"family.model_types ({', '.join(model_types)})")
            self.known(entry, ("architecture", "config", "null"), f"export.{model_type}")
        architectures = {t: e["architecture"] for t, e in exports.items() if "architecture" in e}
        base_config = {t: {**e.get("config", {}), **{k: None for k in e.get("null", [])}} for t, e in exports.items()}
        templates = self.table(data, "templates")
        for key, template in templates.items():
            if not isinstance(template, str):
                self.fail(key, f"templates.{key} must be a string (the spec's text)")
        family = Family(
            name=name, model_types=tuple(model_types), params=self.params(self.table(data, "params", required=True)),
            hyper=tuple(self.hyper(k, v) for k, v in self.table(data, "hyper", required=True).items()),
            requires=tuple(self.require(r) for r in self.array(data, "requires")),
            op_args=tuple(self.op_arg(o) for o in self.array(data, "op_args")),
            tie=(tie["head"], tie["key"], tie.get("default", False)), ignore=tuple(ignore),
            aliases=tuple(tuple(a) for a in aliases), base_config=base_config, architectures=architectures,
            templates=templates)
        return family

    def hyper(self, name: str, value) -> Hyper:
        if isinstance(value, (str, list)):
            return Hyper(name, self.keys_of(value, f"hyper.{name}"))
        if not isinstance(value, dict):
            self.fail(name, f"hyper.{name} must be a config key, a list of them, or a table with `keys`")
        self.known(value, ("keys", "default", "when", "needed"), f"hyper.{name}", at=name)
        if "keys" not in value:
            self.fail(name, f"hyper.{name} needs `keys`: the config.json key(s) it is read from")
        default = value.get("default")
        if isinstance(default, str):
            self.expression(default, name, f"hyper.{name}.default")
        when = None
        if "when" in value:
            condition = value["when"]
            if not isinstance(condition, dict) or "keys" not in condition or "value" not in condition or \
                    set(condition) - {"keys", "value", "default"}:
                self.fail(name, f"hyper.{name}.when must be {{ keys = [...], value = ..., default = ... }}")
            when = When(self.keys_of(condition["keys"], f"hyper.{name}.when"), condition["value"],
                        condition.get("default"))
        if not isinstance(value.get("needed", False), bool):
            self.fail(name, f"hyper.{name}.needed must be true or false")
        return Hyper(name, self.keys_of(value["keys"], f"hyper.{name}"), default, when, value.get("needed", False))

    def require(self, entry: dict) -> Require:
        self.known(entry, ("keys", "allowed", "default"), "requires")
        if "keys" not in entry or not isinstance(entry.get("allowed"), list):
            self.fail("requires", "each [[requires]] needs `keys` and a list `allowed`")
        return Require(self.keys_of(entry["keys"], "requires"), tuple(entry["allowed"]), entry.get("default"))

    def op_arg(self, entry: dict) -> OpArg:
        self.known(entry, ("op", "arg", "keys", "values", "default"), "op_args")
        from lmspec.compiler.registry import get_op

        op = entry.get("op")
        if not isinstance(op, str) or get_op(op) is None:
            self.fail("op", f"op_args: op {op!r} is not an op of the language")
        if not any(a.name == entry.get("arg") for a in get_op(op).args):
            self.fail("arg", f"op_args: {op} has no argument {entry.get('arg')!r}")
        values = entry.get("values")
        if values is not None and not (isinstance(values, dict) and all(isinstance(v, list) for v in values.values())):
            self.fail("values", "op_args: values must map each spec value to a list of config values")
        return OpArg(op, entry["arg"], self.keys_of(entry.get("keys"), "op_args"),
                     {k: tuple(v) for k, v in values.items()} if values else None, entry.get("default"))

    def params(self, table: dict) -> tuple:
        rows = []
        for name, source in table.items():
            rows.append((name, self.source(name, source)))
        return tuple(rows)

    def source(self, name: str, source):
        if isinstance(source, str):
            return source
        if not isinstance(source, dict):
            self.fail(name, f"params.{name!r} must be a tensor name or a table (transpose, cat or stack)")
        kinds = [k for k in ("transpose", "cat", "stack") if k in source]
        if len(kinds) != 1:
            self.fail(name, f"params.{name!r} needs exactly one of transpose, cat, stack")
        kind = kinds[0]
        if kind == "transpose":
            self.known(source, ("transpose",), f"params.{name!r}", at=name)
            if not isinstance(source["transpose"], str):
                self.fail(name, f"params.{name!r}: transpose names one tensor")
            return T(source["transpose"])
        if kind == "cat":
            self.known(source, ("cat", "parts"), f"params.{name!r}", at=name)
            names = source["cat"]
            if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
                self.fail(name, f"params.{name!r}: cat names two or more tensors")
            parts = source.get("parts")
            if parts is not None:
                if not isinstance(parts, list) or len(parts) != len(names):
                    self.fail(name, f"params.{name!r}: parts gives one relative size per tensor in cat")
                for part in parts:
                    self.expression(str(part), name, f"params.{name!r}.parts")
            return Cat(*names, parts=tuple(str(p) for p in parts) if parts is not None else None)
        self.known(source, ("stack", "fused"), f"params.{name!r}", at=name)
        inner = self.source(name, source["stack"])
        if not isinstance(inner, (str, Cat)) or "{j}" not in str(inner):
            self.fail(name, f"params.{name!r}: stack holds a tensor name or a cat with {{j}}, the expert")
        return Stack(inner, source.get("fused"))

    # ---- small checks ---------------------------------------------------------------------

    def known(self, table: dict, allowed: tuple, where: str, at: str | None = None) -> None:
        for key in table:
            if key not in allowed:
                place = f"{where}." if where else ""
                self.fail(at or key, f"unknown key {place}{key} (expected one of: {', '.join(allowed)})")

    def table(self, data: dict, key: str, required: bool = False) -> dict:
        if key not in data:
            if required:
                raise MapError(f"{self.where}: the map has no [{key}] table")
            return {}
        if not isinstance(data[key], dict):
            self.fail(key, f"{key} must be a table")
        return data[key]

    def array(self, data: dict, key: str) -> list:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(key, f"{key} must be written [[{key}]]: an array of tables")
        return value

    def string(self, table: dict, key: str, where: str, required: bool = False) -> str:
        if key not in table and required:
            self.fail(where.split(".")[0], f"{where} is missing")
        if not isinstance(table.get(key), str):
            self.fail(key, f"{where} must be a string")
        return table[key]

    def strings(self, table: dict, key: str, where: str, required: bool = False) -> list[str]:
        if key not in table:
            if required:
                self.fail(where.split(".")[0], f"{where} is missing")
            return []
        value = table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (required and not value):
            self.fail(key, f"{where} must be a list of strings")
        return value

    def keys_of(self, value, where: str) -> tuple[str, ...]:
        keys = [value] if isinstance(value, str) else value
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            self.fail(where.split(".")[-1], f"{where}: keys must be a config.json key or a list of them")
        return tuple(keys)

    def expression(self, text: str, at: str, where: str) -> None:
        try:
            python_ast.parse(text, mode="eval")
        except SyntaxError:
            self.fail(at, f"{where}: {text!r} is not an expression")
