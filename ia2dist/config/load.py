"""Loading a config: YAML plus ``key=value`` overrides, the protocol's defaults, coercion into the
section dataclasses, validation, and each problem named by where its value came from (``FILE:LINE``
or ``override KEY=VALUE``). Also the resolved config's dict, hash, YAML dump and differences."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from ia2dist.config.sections import PROTOCOL_DEFAULTS, PROTOCOLS, RunConfig, protocol_default
from ia2dist.config.validate import did_you_mean, validate
from ia2dist.errors import ConfigError
from ia2dist.secrets import redact


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert ``value`` (from YAML or an override) to ``tp``; record a problem instead of raising."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # a scalar-or-list field (a sweep, e.g. train.lr): a list value takes the list type
        listed = [a for a in inner if typing.get_origin(a) is list]
        if isinstance(value, list) and listed:
            return _coerce(value, listed[0], where, problems)
        return _coerce(value, inner[0], where, problems)
    if origin is Literal:
        if value not in args:
            close = did_you_mean(str(value), [str(a) for a in args])
            problems.append(f"{where}: {value!r} is not allowed; "
                            + (f"did you mean {close!r}? " if close else "")
                            + f"use one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}; write [a, b, ...]")
            return []
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}; write "
                            "{key: value, ...}")
            return {}
        return {str(k): _coerce(v, args[1], f"{where}.{k}", problems) for k, v in value.items()}
    if _is_dataclass_type(tp):
        return _build(tp, value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                    return int(value)
            except ValueError:
                pass
            problems.append(f"{where}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return 0.0
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected a number, got {value!r}")
            return 0.0
    if tp is str:
        if isinstance(value, bool):
            problems.append(f"{where}: got the boolean {value} (YAML reads yes/no/on/off/true/false "
                            "unquoted as booleans); quote it, e.g. 'yes'")
            return str(value)
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {type(value).__name__}")
            return ""
        return str(value)
    return value


def _build(cls, data: Any, where: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of fields, got {type(data).__name__}")
        return cls()
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = did_you_mean(str(key), names)
            hint = f"; did you mean {close!r}?" if close else f"; known fields: {', '.join(names)}"
            problems.append(f"{dotted}: unknown field{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], dotted, problems)
    return cls(**kwargs)



def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to the raw mapping."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {key}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = _parse_scalar(raw)
    return data


def apply_protocol(data: dict, problems: list[str]) -> dict:
    """Fill the raw config mapping with the defaults of its ``protocol`` (PROTOCOL_DEFAULTS) where
    the user set nothing; a mapping-valued default is merged under the user's own keys."""
    protocol = data.get("protocol", "reference")
    if protocol not in PROTOCOLS:
        return data  # the type check reports it
    for dotted in PROTOCOL_DEFAULTS:
        *sections, leaf = dotted.split(".")
        node = data
        for name in sections:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                break  # reported by the type check
            node = child
        else:
            value = protocol_default(dotted, protocol)
            if leaf not in node or node[leaf] is None and isinstance(value, dict):
                node[leaf] = value
            elif isinstance(value, dict) and isinstance(node[leaf], dict):
                node[leaf] = {**value, **node[leaf]}
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                extra_checks: Callable[[RunConfig], list[str]] | None = None) -> RunConfig:
    """Read YAML (or defaults when ``path`` is None), apply overrides, type-check and validate.

    Every problem is reported in one ``ConfigError``, each named by where its value came from
    (``FILE:LINE`` or ``override KEY=VALUE``); a check that depends on a field already reported
    invalid is left out (its message would be about the bad value, not a second mistake).
    ``extra_checks(cfg)`` adds the problems of the command line's other choices (e.g. --method)
    to the same pass."""
    from ia2dist.data.tasks import TASKS  # here, not at the top: the registry's records load torch

    problems: list[str] = []
    source = str(path) if path else "defaults"
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: config file not found; pass an existing YAML file"], source)
        text = p.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError([f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"],
                              source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{p}: top level must be a mapping of sections"], source)
        data = loaded or {}
        origins.update(_yaml_lines(text, str(p)))
    for item in overrides or []:
        origins[item.split("=", 1)[0].strip()] = f"override {item}"
    data = apply_overrides(data, list(overrides or []), problems)
    data = apply_protocol(data, problems)
    cfg = _build(RunConfig, data, "", problems)
    reported = {_field_of(x) for x in problems}
    semantic = validate(cfg, TASKS) + (extra_checks(cfg) if extra_checks and not problems else [])
    for problem in semantic:
        if _field_of(problem) not in reported and not any(_mentions(problem, f) for f in reported):
            problems.append(problem)
            reported.add(_field_of(problem))
    if problems:
        raise ConfigError([_locate(x, origins) for x in problems], None)
    return cfg


def _field_of(problem: str) -> str:
    """'train.methods[1]: ...' -> 'train.methods'."""
    return problem.split(":", 1)[0].split("[", 1)[0].strip()


def _mentions(problem: str, dotted: str) -> bool:
    """Whether a problem's text refers to the config field ``dotted`` (a derived problem)."""
    return "." in dotted and re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", problem) is not None


def _locate(problem: str, origins: dict[str, str]) -> str:
    """Prefix a problem with where its field's value came from (the longest matching key)."""
    field_ = _field_of(problem)
    for key in sorted(origins, key=len, reverse=True):
        if field_ == key or field_.startswith(key + ".") or key.startswith(field_ + "."):
            where = origins[key]
            return problem if problem.startswith(where) else f"{where}: {problem}"
    return problem


def _yaml_lines(text: str, name: str) -> dict[str, str]:
    """{dotted key: 'FILE:LINE'} of every mapping key in a YAML document."""
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                out[dotted] = f"{name}:{key.start_mark.line + 1}"
                walk(value, dotted + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def differences(old, new, ignore=frozenset(), _prefix: str = "") -> list[str]:
    """'dotted.path: old -> new' for every leaf where two config-like dicts differ, skipping the
    dotted paths (or whole sections) in ``ignore`` and values a saved config holds redacted."""
    path = _prefix.rstrip(".")
    if path in ignore:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), ignore, f"{_prefix}{key}.")
        return out
    if old != new and old != "<redacted>":
        return [f"{path}: {old!r} -> {new!r}"]
    return []


def config_hash(cfg: RunConfig) -> str:
    """Stable hash of the resolved config (sorted JSON), first 16 hex digits of sha256."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, with anything that looks like a credential redacted."""
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True)
