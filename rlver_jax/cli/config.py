"""`rlver-jax config show`: a run config resolved, each field with its default and doc.

    rlver-jax config show                                   # every section, its dataclass, a doc
    rlver-jax config show --config configs/qwen2.5-7b_grpo_plain_h100.yaml learner.actor_lr=2e-6
    rlver-jax config show --defaults                        # the tree of the defaults

The tree is the one `rlver-jax train` would run (bases merged, overrides applied, every value
validated), printed as YAML that loads back: each line's comment gives the field's default,
a `*` where the value differs from it (with the file or override that set it), and the
field's doc. The docs are read from the config dataclasses (`config_io.field_docs`), so code
and command share one text. An absent checkpoint path (a placeholder such as
`/path/to/Qwen2.5-7B-Instruct`) is shown as written, not refused: nothing is loaded here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

OVERRIDE = "command line"  # the origin of a key=value override
_VALUE_WIDTH = 44  # the column the comments start at (longer lines push them right)


def main(argv: Sequence[str], out: Callable[[str], None] = print) -> int:
    """`config show ...`; exit status 0, or 2 with a one-line config error."""
    parser = argparse.ArgumentParser(
        prog="rlver-jax config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="the resolved config with defaults and docs")
    show.add_argument("--config", help="a RunConfig YAML file (bases are merged in)")
    show.add_argument("--defaults", action="store_true", help="the tree of the defaults")
    show.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(list(argv))

    from rlver_jax.config_io import ConfigError

    if args.config is None and not args.defaults and not args.overrides:
        for line in section_lines():
            out(line)
        return 0
    try:
        lines = show_lines(args.config, args.overrides)
    except ConfigError as err:
        print(f"rlver-jax config: config error: {err}", file=sys.stderr)
        return 2
    for line in lines:
        out(line)
    return 0


# --------------------------------------------------------------------------- sections
def sections(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, type, str]]:
    """(dotted name, dataclass, one-line doc) of every section of RunConfig, depth first; the
    doc is the parent's doc of the field where it has one, else the class's."""
    from rlver_jax.config_io import class_doc, field_docs
    from rlver_jax.run_config import RunConfig

    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            name = prefix + field.name
            yield name, hint, docs[field.name] or class_doc(hint)
            yield from sections(hint, name + ".")


def section_lines() -> list[str]:
    """The listing of `config show` without a config."""
    from rlver_jax.config_io import class_doc
    from rlver_jax.run_config import RunConfig

    rows = [("(top)", RunConfig.__name__, class_doc(RunConfig))]
    rows += [(name, cls.__name__, doc) for name, cls, doc in sections()]
    width = max(len(r[0]) for r in rows) + 2
    kind = max(len(r[1]) for r in rows) + 2
    lines = ["sections of a run config (`config show --config X` prints one resolved):"]
    lines += [f"  {name:<{width}}{cls:<{kind}}{doc}" for name, cls, doc in rows]
    return lines


# --------------------------------------------------------------------------- the tree
def show_lines(path: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """The resolved tree of a config file (None: the defaults) plus overrides, one field a
    line, as YAML with `# default | doc` comments."""
    from rlver_jax.config_io import apply_overrides, from_dict, resolve_yaml, to_dict
    from rlver_jax.run_config import RunConfig

    data, origins = resolve_yaml(path) if path is not None else ({}, {})
    data = apply_overrides(data, overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for old in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[old]
        origins[key] = OVERRIDE
    with tempfile.TemporaryDirectory() as stand_in:
        absent = _stand_in_paths(data, stand_in)
        cfg = from_dict(RunConfig, data)
    tree = to_dict(cfg)
    for keys, original in absent.items():
        _set(tree, keys, original)
    header = [f"# {path} resolved" if path else "# the defaults"]
    if path is not None:
        bases = sorted({o for o in origins.values() if o not in (str(path), OVERRIDE)})
        if bases:
            header.append(f"# with bases: {', '.join(bases)}")
    if overrides:
        header.append(f"# overrides: {' '.join(overrides)}")
    header.append("# key: value  # default (* = differs; [where it was set]) | doc")
    return header + list(_tree_lines(RunConfig, tree, to_dict(RunConfig()), origins, absent))


def _stand_in_paths(data: dict[str, Any], stand_in: str) -> dict[tuple[str, ...], str]:
    """Point each absent hf / gguf checkpoint path of `data` (a ModelSpec section) at an
    existing directory so that the tree validates; returns {keys: the path as written}."""
    from rlver_jax.model_io.loader import ModelSpec

    absent: dict[tuple[str, ...], str] = {}
    for name, cls, _ in sections():
        if cls is not ModelSpec:
            continue
        node: Any = data
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get("source") not in ("hf", "gguf"):
            continue
        path = node.get("path")
        if isinstance(path, str) and path and not Path(path).exists():
            absent[(*name.split("."), "path")] = path
            node["path"] = stand_in
    return absent


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


def _tree_lines(
    cls: type,
    values: dict[str, Any],
    defaults: dict[str, Any],
    origins: dict[str, str],
    absent: dict[tuple[str, ...], str],
    prefix: tuple[str, ...] = (),
) -> Iterator[str]:
    from rlver_jax.config_io import class_doc, field_docs

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    indent = "  " * len(prefix)
    for field in dataclasses.fields(cls):
        name, hint = field.name, hints[field.name]
        keys = (*prefix, name)
        value, default = values[name], defaults[name]
        if dataclasses.is_dataclass(hint):
            doc = docs[name] or class_doc(hint)
            yield _with_comment(f"{indent}{name}:", f"{hint.__name__}: {doc}")
            yield from _tree_lines(hint, value, default, origins, absent, keys)
            continue
        comment = f"default {_scalar(default)}"
        if value != default:
            where = origins.get(".".join(keys))
            comment = f"* {comment}" + (f" [{where}]" if where else "")
        if keys in absent:
            comment += " (path not on this machine)"
        if docs[name]:
            comment += f" | {docs[name]}"
        yield _with_comment(f"{indent}{name}: {_scalar(value)}", comment)


def _with_comment(text: str, comment: str) -> str:
    return f"{text:<{_VALUE_WIDTH}}  # {comment}"


def _scalar(value: Any) -> str:
    """A value as YAML on one line (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if "\n" in text:  # a string with a line break: JSON's quoting is YAML on one line
        return json.dumps(value, ensure_ascii=False)
    return text
