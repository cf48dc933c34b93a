"""A recipe file -> a raw mapping -> typed dataclasses, strictly; and the paths a config names.

    raw = read_recipe(Path("recipes/smollm2/135M_eagle1_ppow.yaml"))   # {"stage": "ppow", "model": {...}, ...}
    cfg = build(Config, raw, prefix="")      # what `config.load_config` does after the overrides
    input_paths(cfg)   # {"model.drafter": InputPath(value, absolute path, problem or None)}

Relative paths resolve against the current working directory (README, "Paths in a recipe").

PyYAML's own loader keeps the last of two equal keys without a word; `_StrictLoader` (a SafeLoader)
refuses them, naming the key and both lines. Every failure is one `UserError` line naming the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from ppow_plugin.errors import UserError

INT_LIMIT = 2**63  # |int| for every int field (int64: what torch and NumPy hold)
FLOAT_LIMIT = 3.4028234663852886e38  # |float| for every float field: float32's largest (our tensors' dtype)


class DuplicateKey(Exception):
    """A mapping gave `key` twice: on line `first` and again on line `line` (1-based)."""

    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKey(key, line, first[key])
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` that raises `DuplicateKey` for a key given twice in one mapping."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def read_recipe(p: Path) -> dict[str, Any]:
    """The raw mapping of recipe file `p`.

    Raises:
        UserError: `p` is a directory, missing, unreadable, not UTF-8, not YAML (with line and column),
            has a duplicate key (with both lines), is empty, or is not a mapping.
    """
    try:
        if p.is_dir():
            inside = sorted(p.glob("*.yaml"))
            hint = f", e.g. {inside[0]}" if inside else ""
            raise UserError(f"recipe {p} is a directory; pass one YAML file{hint}")
        if not p.is_file():
            raise UserError(f"recipe {p} does not exist (tried {os.path.abspath(p)}); pass a YAML file (see recipes/)")
        data = p.read_bytes()
    except OSError as exc:  # permissions, a name too long, ...
        raise UserError(f"recipe {str(p)[:80]} cannot be read ({exc.strerror}); check the path and its "
                        "permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"recipe {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                        "save it as UTF-8") from None
    try:
        raw = parse_yaml(text)
    except DuplicateKey as exc:
        raise UserError(f"recipe {p}, line {exc.line}: key '{exc.key}' is already set on line {exc.first}; "
                        "keep one of them") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {p}{where} is not valid YAML ({exc.problem or exc.context}); fix it there") from None
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None or raw == {}:
        raise UserError(f"recipe {p} is empty; a recipe sets at least stage (sft or ppow), model.target and, "
                        "for ppow, model.drafter: start from a file under recipes/")
    if not isinstance(raw, dict):
        raise UserError(f"recipe {p} must be a mapping of sections, got {type(raw).__name__}")
    return raw


class InputPath(NamedTuple):
    value: str            # as the recipe says
    path: Path            # absolute: relative values resolve against the current working directory
    problem: str | None   # None = there and of the right kind


def input_paths(cfg: Any) -> dict[str, InputPath]:
    """What a run with `config.Config` `cfg` reads, by recipe key, resolved the way `ppow train` opens them.

    `model.target=default` (the embedded target, prepared on first use) is not a path.
    """
    named = {"model.target": (None if cfg.model.target == "default" else cfg.model.target, "model"),
             "model.drafter": (cfg.model.drafter, "model"),
             "data.path": (cfg.data.path, "generated" if cfg.data.dataset == "generated" else "file"),
             "reward.gamma_profile": (cfg.reward.gamma_profile, "file")}
    out = {}
    for key, (value, kind) in named.items():
        if value is None:
            continue
        p = Path(os.path.abspath(value))
        try:
            if not p.exists():
                problem = "does not exist"
            elif kind == "file":
                problem = None if p.is_file() else "is not a file"
            elif kind == "generated":
                problem = None if (p / "provenance.json").is_file() else "is not a `ppow data generate` dir"
            else:
                problem = None if (p / "config.json").is_file() else "is not a model directory with config.json"
        except OSError as exc:  # e.g. a name too long
            problem = f"cannot be checked ({exc.strerror})"
        out[key] = InputPath(value, p, problem)
    return out


# ----------------------------------------------------------------------------------------------
# Raw mapping -> typed dataclasses


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a raw mapping, strictly: unknown keys (with the nearest name), types,
    int64 / finite-float32 bounds, then the dataclasses' own `__post_init__` invariants (ValueError)."""
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolving the annotations is most of a load's time


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        arms = [a for a in args if a is not type(None)]
        for arg in arms:
            try:
                return _coerce(arg, value, name)
            except UserError as exc:
                errors.append(str(exc))
        # the error of the arm of the value's own type when there is one (2**63 for `Literal[...] | int`: the int's)
        raise UserError(next((e for a, e in zip(arms, errors) if a is type(value)), errors[0]))
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{name} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
        if not -INT_LIMIT <= value < INT_LIMIT:  # the one bound every int field shares: what torch/NumPy hold
            raise UserError(f"{name} must be an integer below 2**63 in size, got {str(value)[:24]}...")
        return value
    if tp is float:
        # YAML reads "1e-5" (no dot) as a string; accept numeric strings.
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        except OverflowError:  # an int beyond float range
            number = math.inf
        if number is None:
            raise UserError(f"{name} must be a number, got {value!r}")
        if not abs(number) <= FLOAT_LIMIT:  # the one check of nan/inf (and float32 overflow) for every float field
            raise UserError(f"{name} must be a finite number (|x| <= 3.4e38, float32), got {repr(value)[:24]}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {name} has unsupported type {tp}")


# ----------------------------------------------------------------------------------------------
# Invariants and overrides (used by config)


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """The one-line ValueError of a broken invariant: `name (value) must be rule`.

    Written as "ok" (not "bad") so that nan, for which every comparison is False, always fails.
    """
    if not ok:
        raise ValueError(f"{name} ({value!r}) must be {rule}")


def require_text(value: str | None, name: str, what: str, optional: bool = True) -> None:
    """Strings that name something (paths, devices) are not empty; None is allowed when optional."""
    if value is None and optional:
        return
    require(bool(value and value.strip()), name, value, what)


def apply_override(raw: dict, item: str) -> None:
    """A dotted `section.field=value` override into the raw recipe dict (value parsed as a YAML scalar)."""
    if "=" not in item:
        raise UserError(f"override {item!r} must look like section.field=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except (yaml.YAMLError, DuplicateKey):
        value = text
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty `section:` in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value
