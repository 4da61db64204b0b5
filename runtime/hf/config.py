"""config.json read and checked against a family's tables and a spec, and written for a spec."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lmspec.runtime.errors import HFError
from lmspec.runtime.hf.expressions import evaluate
from lmspec.runtime.hf.families import Family, Hyper, spec_literal
from lmspec.runtime.hf.shipped import family_for_model_type, shipped_model_types

CONFIG_FILE = "config.json"


def read_config(directory: Path) -> dict:
    if not directory.exists():
        raise HFError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise HFError(f"{directory}: not a directory (expected a Hugging Face model directory)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise HFError(f"{path}: missing (a Hugging Face model directory holds config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: not a JSON object")
    return config


def family_of(config: dict, where: str = CONFIG_FILE) -> tuple[str, Family]:
    model_type = config.get("model_type")
    family = family_for_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        known = ", ".join(sorted(shipped_model_types()))
        raise HFError(f"{where}: model_type {model_type!r} is not supported (supported: {known})")
    return model_type, family


MISSING = object()


def config_get(config: dict, key: str):
    """The value at a dotted key path, or MISSING."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def first_present(config: dict, keys: tuple[str, ...]) -> tuple[str, object]:
    """(key, value) of the first key present with a value that is not null, else (keys[0], MISSING)."""
    for key in keys:
        value = config_get(config, key)
        if value is not MISSING and value is not None:
            return key, value
    return keys[0], MISSING


def _set_path(config: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        config = config.setdefault(part, {})
    config[parts[-1]] = value


def hyper_from_config(family: Family, config: dict) -> dict[str, tuple[object, str]]:
    """Every hyper-parameter of the family's table: name -> (value or None, the config key read)."""
    found: dict[str, tuple[object, str]] = {}
    for h in family.hyper:
        key, value = first_present(config, h.key_list)
        if h.when is not None:
            _, cond = first_present(config, h.when.keys)
            if (h.when.default if cond is MISSING else cond) != h.when.value:
                found[h.name] = (None, key)
                continue
        if value is MISSING:
            value = _default(h, config)
        found[h.name] = (value, key)
    return found


def _default(h: Hyper, config: dict):
    if isinstance(h.default, str):  # an expression of other config keys
        try:
            return evaluate(h.default, {k: v for k, v in config.items() if isinstance(v, (int, float))})
        except (KeyError, ValueError, ZeroDivisionError):
            return None
    return h.default


def check_requires(family: Family, config: dict) -> list[str]:
    errors = []
    for r in family.requires:
        key, value = first_present(config, r.key_list)
        if value is MISSING:
            value = r.default
        if not any(_same(value, a) for a in r.allowed):
            expected = " or ".join(json.dumps(a) for a in r.allowed)
            errors.append(f"{key} = {json.dumps(value)} is not supported by the {family.name} family "
                          f"(expected {expected})")
    return errors


def _op_arg_values(spec, graph) -> list:
    """The distinct values of one op argument over the graph's nodes, in order."""
    seen = []
    for _, data in graph.nodes():
        if data.get("op") == spec.op:
            value = data["args"].get(spec.arg)
            if not any(_same(value, v) for v in seen):
                seen.append(value)
    return seen


def _op_arg_config_value(spec, config: dict) -> tuple[str, object]:
    """(the key, its value) of an op argument in config.json; the map's default where it has none."""
    key, value = first_present(config, spec.key_list)
    return key, spec.default if value is MISSING else value


def check_op_args(family: Family, config: dict, graph) -> list[str]:
    """Disagreements between op arguments in the spec (an activation, an eps) and config.json."""
    errors = []
    for spec in family.op_args:
        key, value = _op_arg_config_value(spec, config)
        for used in _op_arg_values(spec, graph):
            if spec.values is None:
                accepted = (used,)
            elif used in spec.values:
                accepted = spec.values[used]
            else:
                errors.append(f"the spec's {spec.op}({spec.arg}={_show(used)}) has no {key} "
                              f"in the {family.name} family")
                continue
            if not any(_same(value, a) for a in accepted):
                errors.append(f"config.json {key} = {_show(value)} but the spec's {spec.op} has "
                              f"{spec.arg}={_show(used)} (that is {key} = {_show(accepted[0])})")
    return errors


def op_args_from_config(family: Family, config: dict, where: object = CONFIG_FILE) -> dict[str, object]:
    """The spec value of each op argument the family ties to config.json, named `{op}_{arg}`
    (mlp_act, layernorm_eps): what `import hf --emit-spec` fills a template's placeholders with, so
    that the spec it writes agrees with config.json (check_op_args). A config value the map gives
    no spec value for is an HFError naming the values it knows."""
    found = {}
    for spec in family.op_args:
        key, value = _op_arg_config_value(spec, config)
        if spec.values is None:
            found[spec.placeholder] = value
            continue
        matches = [used for used, accepted in spec.values.items() if any(_same(value, a) for a in accepted)]
        if not matches:
            known = ", ".join(_show(a) for accepted in spec.values.values() for a in accepted)
            raise HFError(f"{where}: {key} = {_show(value)}: the {family.name} map knows no spec "
                          f"{spec.op}({spec.arg}=...) for it (it knows {known}); write a spec and pass --spec")
        found[spec.placeholder] = matches[0]
    return found


def op_args_of_graph(family: Family, graph) -> dict[str, object]:
    """The op arguments the family ties to config.json as the graph uses them, named as in
    op_args_from_config: what a template is filled with to rebuild the graph. An argument whose op
    is absent, or used with several values, has none."""
    found = {}
    for spec in family.op_args:
        used = _op_arg_values(spec, graph)
        if len(used) == 1:
            found[spec.placeholder] = used[0]
    return found


def check_hyper(family: Family, config: dict, graph) -> list[str]:
    """Disagreements between config.json and the spec's hyper-parameters, one phrase each."""
    errors = []
    derived = hyper_from_config(family, config)
    for h in family.hyper:
        value, key = derived[h.name]
        if h.name in graph.hyper:
            spec_value = graph.hyper[h.name]
            if value is None:
                if h.needed:
                    errors.append(f"config.json has no {key}, but the spec has {h.name} = {_show(spec_value)}")
                else:
                    errors.append(f"config.json has no {key} for the spec's {h.name} = {_show(spec_value)}")
            elif not _same(value, spec_value):
                errors.append(f"config.json {key} = {_show(value)} but the spec has {h.name} = {_show(spec_value)}")
        elif h.needed and value is not None:
            errors.append(f"config.json {key} = {_show(value)} but the spec has no {h.name} hyper-parameter")
    head, tie_key, tie_default = family.tie
    if head in graph.params:
        _, tied = first_present(config, (tie_key,))
        tied = tie_default if tied is MISSING else bool(tied)
        spec_tied = graph.params[head].tied_to is not None
        if tied != spec_tied:
            how = f"ties {head} to {graph.params[head].tied_to}" if spec_tied else f"has its own {head}"
            errors.append(f"config.json {tie_key} = {json.dumps(tied)} but the spec {how}")
    return errors


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, str)) or value is None else str(value)


def set_hint(family: Family, config: dict, graph) -> str:
    """`(--set layers=2 ...)` when the mismatches are hyper-parameter values a --set can fix."""
    sets = []
    for name, (value, _) in hyper_from_config(family, config).items():
        if name in graph.hyper and value is not None and not _same(value, graph.hyper[name]):
            sets.append(f"--set {name}={spec_literal(value)}")
    return f" (to size the spec like config.json: {' '.join(sets)})" if sets else ""


def config_for_export(family: Family, model_type: str, graph, dtype: str, eot_id: int | None) -> dict:
    """config.json for a checkpoint that was not imported: the family's base plus the spec's values."""
    if model_type not in family.architectures:
        raise HFError(f"the {family.name} map gives no transformers class for model_type {model_type!r}: "
                      f"add [export.{model_type}] architecture = \"...ForCausalLM\" to it")
    config = {"architectures": [family.architectures[model_type]], "model_type": model_type}
    config.update(json.loads(json.dumps(family.base_config.get(model_type, {}))))
    for h in family.hyper:
        if h.name in graph.hyper:
            _set_path(config, h.key_list[0], graph.hyper[h.name])
            if h.when is not None:
                _set_path(config, h.when.keys[0], h.when.value)
    for spec in family.op_args:
        used = _op_arg_values(spec, graph)
        if used:
            mapped = spec.values.get(used[0], (used[0],)) if spec.values is not None else (used[0],)
            _set_path(config, spec.key_list[0], mapped[0])
    config["bos_token_id"] = config["eos_token_id"] = eot_id
    head, tie_key, _ = family.tie
    config[tie_key] = head in graph.params and graph.params[head].tied_to is not None
    config["dtype"] = dtype
    return config
