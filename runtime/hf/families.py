"""What a Hugging Face model family is, as data: parameter-name tables, config.json -> hyper-parameter
tables, the config values a family's specs assume, and spec templates for `--emit-spec`. The
families are written as TOML maps (runtime/hf/map_file.py reads one; runtime/hf/maps/ holds those
lmspec ships, runtime/hf/shipped.py loads them); this module is the shape they are read into.

A PARAMETER TABLE is a tuple of rows `(lmspec name, source)`. The lmspec name may hold `{i}` (the
layer); the source is one of
    "hf.name"                  copied as it is
    T("hf.name")               transposed (GPT-2's Conv1D keeps weights as [in, out])
    Cat("a", "b", ..., parts=("heads", "kv_heads", "kv_heads"))
                               the HF tensors concatenated along dim 0; `parts` are the relative
                               sizes (expressions of the spec's hyper-parameters; equal if omitted)
    Stack(inner, fused="hf.name")
                               one slice per expert `{j}` along a new dim 0; `inner` is a name or a
                               Cat over names holding `{j}`; `fused` names the single 3-D tensor some
                               files hold instead (transformers' in-memory layout)
Every parameter the spec owns must match exactly one row; rows the spec lacks are skipped (the
Hugging Face tensors they name must then be absent, or the import says which ones were unused).

A HYPER TABLE is a tuple of `Hyper(name, keys, ...)`: the spec hyper-parameter `name` equals the
config value at the first of `keys` present (dotted paths into nested dicts). Only hyper-parameters
the spec has are compared. `Require(keys, allowed)` rows name config values a family's specs assume;
`OpArg(op, arg, keys, values)` rows tie an op argument used in the spec (an activation, an eps) to
a config value. The family's `tie` names the output head and the config key that says it is tied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


# ------------------------------------------------------------------------------------ table entries

@dataclass(frozen=True)
class T:
    """A transposed copy: HF keeps [in, out], lmspec [out, in]."""
    name: str


@dataclass(frozen=True)
class Cat:
    """HF tensors concatenated along dim 0, in this order."""
    names: tuple[str, ...]
    parts: tuple[str, ...] | None = None  # relative sizes as expressions of hyper-parameters

    def __init__(self, *names: str, parts: tuple[str, ...] | None = None):
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parts", parts)


@dataclass(frozen=True)
class Stack:
    """One HF tensor (or Cat of tensors) per expert `{j}`, stacked along a new dim 0."""
    inner: str | Cat
    fused: str | None = None


Source = "str | T | Cat | Stack"


@dataclass(frozen=True)
class When:
    """A condition on config.json: the value at the first present key equals `value`."""
    keys: tuple[str, ...]
    value: object
    default: object = None


@dataclass(frozen=True)
class Hyper:
    """Spec hyper-parameter `name` <- config.json at the first present key of `keys`.

    `default`: the value when no key is present (a constant, or a str expression of config keys
    such as "hidden_size // num_attention_heads"). `when`: only read when the condition holds
    (else the config has no value). `needed`: a value in the config that the spec must have a
    hyper-parameter for (rope scaling, a sliding window), because ignoring it changes the model."""
    name: str
    keys: tuple[str, ...] | str
    default: object = None
    when: When | None = None
    needed: bool = False

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys


@dataclass(frozen=True)
class Require:
    """A config value the family's specs assume (the op set has no hyper-parameter for it)."""
    keys: tuple[str, ...] | str
    allowed: tuple
    default: object = None

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys


@dataclass(frozen=True)
class OpArg:
    """An op argument of the spec that a config value must agree with: every `op` node's `arg`,
    mapped through `values` (spec value -> the config values meaning the same; the first is what
    export writes; None: the same value), equals the config value at `keys` (else `default`)."""
    op: str
    arg: str
    keys: tuple[str, ...] | str
    values: dict | None = None
    default: object = None

    @property
    def key_list(self) -> tuple[str, ...]:
        return (self.keys,) if isinstance(self.keys, str) else self.keys

    @property
    def placeholder(self) -> str:
        """Its name in an `--emit-spec` template: `{mlp_act}`, `{layernorm_eps}`."""
        return f"{self.op}_{self.arg}"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values; the first is the default for export
    params: tuple[tuple[str, object], ...]
    hyper: tuple[Hyper, ...]
    requires: tuple[Require, ...] = ()
    op_args: tuple[OpArg, ...] = ()
    tie: tuple[str, str, bool] = ("lm_head.weight", "tie_word_embeddings", False)  # head, config key, default
    ignore: tuple[str, ...] = ()  # regexes of HF tensors that hold no parameter (old buffers)
    aliases: tuple[tuple[str, str], ...] = ()  # (prefix, replacement) also accepted on import
    base_config: dict = field(default_factory=dict)  # per model_type: what export writes besides the table's
    architectures: dict = field(default_factory=dict)  # model_type -> transformers class name
    # `import hf --emit-spec` specs, by "<model_type>/<rope_type>", "<model_type>", "<family>/<rope_type>"
    # or "<family>", with `{hyper}` placeholders (template_for, fill_template)
    templates: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------- spec templates
# `lmspec import hf DIR --emit-spec FILE` writes the first template found under
# "<model_type>/<rope_type>", "<model_type>", "<family>/<rope_type>", "<family>" (rope_type from
# config.json's rope_parameters or rope_scaling, e.g. "llama/llama3"), with `{hyper}` replaced by
# the values from config.json (every Hyper of the family, plus `{name}`, the model's name made from
# the directory's, and `{source}`, the directory's name). Only `{identifier}` is replaced, so the
# braces of `model x {` and `repeat ... {` stay as they are. The spec it gives is then checked
# against config.json like any other.

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def template_for(model_type: str, family: Family, rope_type: str | None = None) -> str | None:
    keys = [f"{model_type}/{rope_type}", model_type, f"{family.name}/{rope_type}", family.name]
    return next((family.templates[k] for k in keys if family.templates.get(k)), None)


def fill_template(template: str, values: dict[str, object]) -> tuple[str, list[str]]:
    """The template with `{name}` replaced by values; also the placeholders that had no value."""
    missing: list[str] = []

    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key not in values or values[key] is None:
            missing.append(key)
            return match.group(0)
        return spec_literal(values[key])

    return _PLACEHOLDER.sub(replace, template), missing


def spec_literal(value: object) -> str:
    """A hyper-parameter value as the spec language writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):  # a per-layer list (layer_types, no_rope_layers)
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else spec_literal(v) for v in value) + "]"
    if value is None:
        return "none"
    if isinstance(value, float):
        text = repr(value)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    return str(value)
