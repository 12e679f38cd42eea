"""Typed configs from YAML and `key=value` overrides, with errors that name the key.

Every config in rlver_jax is a frozen dataclass. This module builds one from a YAML file (read
with `yaml.safe_load`) plus dotted command-line overrides (`learner.actor_lr=2e-6`), checking
each value against the field's type hint before any work starts: an unknown key, a value of the
wrong type or a value outside a `Literal` fails with the full dotted key in the message.

Bases: a file's top-level `base:` (a path relative to that file, or a list of them) names files
whose resolved trees are merged first, in order, under the file's own keys: mappings merge key by
key, lists and scalars replace (`null` too). Bases may have bases: each base merges as its whole
resolved tree, so keep shared keys in one base and partial overlays free of bases. A cycle is an
error naming the files. Only the top level is special: `user.reference.base` is a plain field.
Overrides apply after all of it, and what a run saves (`config.yaml`) is the resolved tree.

    # configs/qwen2.5-7b_ppo_think_v5p.yaml
    base: [qwen2.5-7b/base.yaml, qwen2.5-7b/ppo.yaml, qwen2.5-7b/think.yaml, qwen2.5-7b/v5p.yaml]
    name: qwen2.5-7b_ppo_think_v5p

Field docs (`field_docs`) are read from each dataclass's source, so that `rlver-jax config show`
and the code share one text: a `name: text` entry of the class docstring, else a string or a
`# comment` next to the field.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import os
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

BASE_KEY = "base"  # the top-level key that names a config file's bases


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's tree with its `base:` files merged in (see the module doc)."""
    return resolve_yaml(path)[0]


def resolve_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(the resolved tree of a config file, the file that set each leaf: dotted key -> path).

    The tree has no `base` key; a leaf's file is the one whose value won the merge."""
    origins: dict[str, str] = {}
    tree = _resolve(Path(path), str(path), (), origins)
    return tree, origins


def _resolve(
    file: Path, label: str, stack: tuple[tuple[Path, str], ...], origins: dict[str, str]
) -> dict[str, Any]:
    real = file.resolve()
    if any(real == seen for seen, _ in stack):
        chain = " -> ".join([*(name for _, name in stack), label])
        raise ConfigError(f"{stack[-1][1]}: {BASE_KEY}: a cycle of bases: {chain}")
    data = read_yaml(file)
    bases = data.pop(BASE_KEY, None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is None:
        bases = []
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{label}: {BASE_KEY}: expected a path or a list of paths (relative to the file), "
            f"got {bases!r}"
        )
    tree: dict[str, Any] = {}
    for base in bases:
        base_file = file.parent / base
        base_label = os.path.normpath(base_file)
        if not base_file.is_file():
            raise ConfigError(f"{label}: {BASE_KEY}: {base!r} does not exist ({base_label})")
        base_origins: dict[str, str] = {}
        base_tree = _resolve(base_file, base_label, (*stack, (real, label)), base_origins)
        _merge(tree, base_tree, origins, lambda key, o=base_origins, f=base_label: o.get(key, f))
    _merge(tree, data, origins, lambda key: label)
    return tree


def _merge(
    under: dict[str, Any],
    over: dict[str, Any],
    origins: dict[str, str],
    origin_of: Callable[[str], str],
    prefix: str = "",
) -> None:
    """Merge `over` into `under` in place (mappings key by key; anything else replaces) and
    record in `origins` where each replaced leaf came from."""
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(under.get(key), dict):
            _merge(under[key], value, origins, origin_of, dotted + ".")
            continue
        for old in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
            del origins[old]
        under[key] = _deep_copy(value)
        _mark(value, dotted, origins, origin_of)


def _mark(value: Any, dotted: str, origins: dict[str, str], origin_of: Callable[[str], str]):
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _mark(child, f"{dotted}.{key}", origins, origin_of)
    else:
        origins[dotted] = origin_of(dotted)


def deep_merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over a copy of `under`: mappings key by key; lists and scalars replace."""
    out = _deep_copy(under)
    _merge(out, over, {}, lambda key: "")
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML mapping read with the safe loader (no arbitrary Python objects; bases kept)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b.c=value` override set (values parsed as YAML scalars)."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. trainer.steps=10)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r} ({err})") from None
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, recursively, validating keys and value types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    renamed = getattr(cls, "RENAMED", {})  # a dataclass's {old key: the key that replaced it}
    for name in sorted(set(data) & set(renamed)):
        where = prefix + "." if prefix else ""
        raise ConfigError(f"config key {where}{name} was replaced by {renamed[name]}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix + "." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!r}; allowed keys"
            f"{' under ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _convert(v, a, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def to_dict(config: Any) -> Any:
    """A plain, YAML-safe representation of a (nested) config dataclass."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    return config


# --------------------------------------------------------------------------- field docs
_DOC_MAX = 150  # characters of a one-line doc before it is cut at a word


def class_doc(cls: type) -> str:
    """The first sentence of a dataclass's docstring, on one line ("" when it has none)."""
    return _one_line(_own_docstring(cls).split("\n\n")[0])


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """A one-line doc for each field of dataclass `cls` ("" where it has none), from the
    class's source: a `name: text` entry of its docstring (``name``: and `a, b:` too), else a
    string literal after the field, a comment on its line, or a comment block right above it."""
    names = [f.name for f in dataclasses.fields(cls)]
    entries = _docstring_entries(_own_docstring(cls), names)
    nearby = _source_docs(cls, names)
    return {n: _one_line(entries.get(n) or nearby.get(n) or "") for n in names}


def _own_docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # dataclasses' generated signature: no docstring
        return ""
    return inspect.cleandoc(doc)


def _docstring_entries(doc: str, names: Sequence[str]) -> dict[str, str]:
    if not doc or not names:
        return {}
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    one = rf"`{{0,2}}(?:{alt})`{{0,2}}(?!\w)"
    head = re.compile(
        rf"(?:^[ \t]*|(?<=[.;])[ \t]+)(?P<names>{one}(?:\s*,\s*{one})*)"
        rf"(?P<paren>\s*\([^()]*\))?\s*:\s+",
        re.MULTILINE,
    )
    matches = list(head.finditer(doc))
    out: dict[str, str] = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(doc)
        text = re.split(r"\n[ \t]*\n", doc[match.end() : end])[0]
        paren = (match.group("paren") or "").strip()
        text = f"{paren} {text}" if paren else text
        for name in re.split(r"\s*,\s*", match.group("names")):
            out.setdefault(name.strip("`"), text)
    return out


def _source_docs(cls: type, names: Sequence[str]) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    with contextlib.suppress(tokenize.TokenError, IndentationError):
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if not re.match(r"(noqa|type:|fmt:|pragma)", text):
                    comments[tok.start[0]] = text
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    out: dict[str, str] = {}
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        if name not in names:
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            out[name] = after.value.value
            continue
        inline = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                  if n in comments]  # fmt: skip
        if inline:
            out[name] = " ".join(inline)
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#") and line in comments:
            above.insert(0, comments[line])
            line -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _one_line(text: str) -> str:
    """Markup-free text on one line: its first sentence, cut at a word past `_DOC_MAX`."""
    text = " ".join(text.split())
    first = re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s+(?=[A-Z(\"'`:])", text)
    text = text[: first.start()] if first else text
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "").replace("`", "")
    text = text.rstrip(" .;,")
    if len(text) > _DOC_MAX:
        text = text[:_DOC_MAX].rsplit(" ", 1)[0].rstrip(" .;,(") + " ..."
    return text
