"""Config bases (`base:`), the shipped configs resolved, and `rlver-jax config show`."""

from __future__ import annotations

import dataclasses
import itertools
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlver_jax.cli import config as config_cli
from rlver_jax.cli.main import main as cli_main
from rlver_jax.config_io import (
    ConfigError,
    deep_merge,
    field_docs,
    load_yaml,
    read_yaml,
    resolve_yaml,
    to_dict,
)
from rlver_jax.run_config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
QWEN = {
    (algo, mode, accel): REPO / "configs" / f"qwen2.5-7b_{algo}_{mode}_{accel}.yaml"
    for algo, mode, accel in itertools.product(("ppo", "grpo"), ("think", "plain"), ("v5p", "h100"))
}
# What each choice of the eight 7B configs sets; everything else is the same in all eight.
AXES: dict[str, dict[str, Any]] = {
    "ppo": {
        "learner.algorithm": "ppo",
        "learner.advantage_estimator": "gae",
        "learner.policy_loss": "ppo",
        "rollout.samples_per_profile": 1,
        "learner.mini_batch_size": 32,
    },
    "grpo": {
        "learner.algorithm": "grpo",
        "learner.advantage_estimator": "grpo",
        "learner.policy_loss": "grpo",
        "rollout.samples_per_profile": 4,
        "learner.mini_batch_size": 128,
    },
    "think": {
        "scaffold.mode": "think",
        "scaffold.format_break_reward": 0.0,
        "rollout.max_reply_tokens": 1024,
    },
    "plain": {
        "scaffold.mode": "plain",
        "scaffold.format_break_reward": None,
        "rollout.max_reply_tokens": 512,
    },
    "v5p": {"mesh.fsdp": -1, "learner.micro_batch_size": 16},
    "h100": {"mesh.fsdp": 8, "learner.micro_batch_size": 8},
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of a nested mapping."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def checkpoint_overrides(path: Path, stand_in: Path) -> list[str]:
    """Point the resolved config's absent hf / gguf checkpoints at an existing directory."""
    data = load_yaml(path)
    overrides = []
    for section in ("model", "user.model"):
        node: Any = data
        for part in section.split("."):
            node = (node or {}).get(part) or {}
        if node.get("source") in ("hf", "gguf"):
            overrides.append(f"{section}.path={stand_in}")
    return overrides


# --------------------------------------------------------------------------- bases
def test_bases_merge_in_order_under_the_file(tmp_path: Path) -> None:
    """Bases apply in list order, the file's own keys last; mappings merge key by key, lists
    and scalars (null included) replace; overrides come after all of it."""
    llm = "user: {llm: {terminators: %s}}\n"
    write(tmp_path / "b/one.yaml", "seed: 1\nlearner: {actor_lr: 2.0e-6}\n" + llm % "[a, b]")
    write(tmp_path / "b/two.yaml", "seed: 2\nlearner: {critic_lr: 3.0e-6}\n" + llm % "[c]")
    top = write(
        tmp_path / "top.yaml",
        "base: [b/one.yaml, b/two.yaml]\nlearner: {actor_lr: 4.0e-6}\n"
        "scaffold: {format_break_reward: null}\n",
    )
    data, origins = resolve_yaml(top)
    assert data == {
        "seed": 2,
        "learner": {"actor_lr": 4.0e-6, "critic_lr": 3.0e-6},
        "user": {"llm": {"terminators": ["c"]}},
        "scaffold": {"format_break_reward": None},
    }
    two = str(tmp_path / "b/two.yaml")
    assert origins == {
        "seed": two,
        "learner.actor_lr": str(top),
        "learner.critic_lr": two,
        "user.llm.terminators": two,
        "scaffold.format_break_reward": str(top),
    }
    cfg = load_run_config(top, ["learner.critic_lr=5e-6"])
    assert (cfg.seed, cfg.learner.actor_lr, cfg.learner.critic_lr) == (2, 4e-6, 5e-6)
    assert cfg.user.llm.terminators == ("c",) and cfg.scaffold.format_break_reward is None
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}, "d": 3}) == {
        "a": {"b": 1, "c": [2]},
        "d": 3,
    }


def test_nested_bases_and_a_single_path(tmp_path: Path) -> None:
    """A base may have bases (paths relative to each file); `base:` may be one string; the
    same file reached twice (not a cycle) is fine. Each base merges as its whole resolved tree,
    so side.yaml (root.yaml + its own keys) sets name back to root's over mid.yaml's."""
    write(tmp_path / "common/root.yaml", "seed: 7\nname: root\ntrainer: {steps: 3}\n")
    write(tmp_path / "common/mid.yaml", "base: root.yaml\nname: mid\n")
    write(tmp_path / "common/side.yaml", "base: root.yaml\ntrainer: {checkpoint_every: 2}\n")
    top = write(tmp_path / "run/top.yaml", "base: [../common/mid.yaml, ../common/side.yaml]\n")
    cfg = load_run_config(top)
    assert (cfg.seed, cfg.name, cfg.trainer.steps, cfg.trainer.checkpoint_every) == (
        7,
        "root",
        3,
        2,
    )
    assert "base" not in load_yaml(top) and read_yaml(top)["base"][0] == "../common/mid.yaml"
    assert load_run_config(tmp_path / "common/mid.yaml").name == "mid"


def test_a_base_cycle_names_the_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "base: [c.yaml]\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: a cycle of bases: .*a\.yaml -> "
                       r".*b\.yaml -> .*c\.yaml -> .*a\.yaml"):  # fmt: skip
        load_yaml(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="a cycle of bases"):
        load_yaml(tmp_path / "self.yaml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("base: missing.yaml\n", r"top\.yaml: base: 'missing\.yaml' does not exist"),
        ("base: [ok.yaml, nope/x.yaml]\n", r"top\.yaml: base: 'nope/x\.yaml' does not exist"),
        ("base: 3\n", r"top\.yaml: base: expected a path or a list of paths"),
        ("base: [ok.yaml, {a: 1}]\n", r"top\.yaml: base: expected a path or a list of paths"),
        ("base: bad.yaml\n", r"bad\.yaml: not valid YAML"),
        ("base: ok.yaml\nlearner: {actor_lrr: 1}\n", r"unknown config key learner\.'actor_lrr'"),
    ],
)
def test_bad_bases_name_the_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    write(tmp_path / "ok.yaml", "seed: 1\n")
    write(tmp_path / "bad.yaml", "a: [1, 2\n")
    top = write(tmp_path / "top.yaml", text)
    with pytest.raises(ConfigError, match=match):
        load_run_config(top)


def test_a_nested_base_key_is_an_ordinary_field(tmp_path: Path) -> None:
    """Only the top level's `base` names files: `user.reference.base` is the lexicon's
    constant."""
    top = write(tmp_path / "top.yaml", "user: {reference: {base: -1.0}}\n")
    assert load_run_config(top).user.reference.base == -1.0


def test_the_run_config_yaml_is_the_resolved_tree(tmp_path: Path) -> None:
    """`config.yaml` in output_dir holds every field, no `base:`: it loads back alone."""
    from rlver_jax.trainer import write_config

    write(tmp_path / "parts/base.yaml", "seed: 5\nlearner: {actor_lr: 3.0e-6}\n")
    top = write(tmp_path / "top.yaml", "base: parts/base.yaml\nname: based\n")
    cfg = load_run_config(top)
    out = tmp_path / "out"
    out.mkdir()
    saved = write_config(cfg, out)
    raw = yaml.safe_load(saved.read_text())
    assert "base" not in raw and raw == to_dict(cfg)
    assert raw["seed"] == 5 and raw["learner"]["actor_lr"] == 3e-6
    assert set(raw) == {f.name for f in dataclasses.fields(RunConfig)}
    assert load_run_config(saved) == cfg


# --------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_resolves(path: Path, tmp_path: Path) -> None:
    cfg = load_run_config(path, checkpoint_overrides(path, tmp_path))
    assert cfg.trainer.steps >= 1
    assert "base" not in load_yaml(path)


def test_the_eight_7b_configs_differ_only_in_their_axes(tmp_path: Path) -> None:
    """Each 7B config is the common tree plus its algorithm, scaffold and accelerator
    choices (and its name); the rest is identical in all eight."""
    trees = {}
    for key, path in QWEN.items():
        cfg = load_run_config(path, checkpoint_overrides(path, tmp_path))
        tree = flat(to_dict(cfg))
        assert tree.pop("name") == path.stem and tree.pop("output_dir") == f"runs/{path.stem}"
        for axis in key:
            for dotted, value in AXES[axis].items():
                assert tree.pop(dotted) == value, (path.name, dotted)
        trees[key] = tree
    first = next(iter(trees.values()))
    for key, tree in trees.items():
        assert tree == first, key
    assert first["model.source"] == first["user.model.source"] == "hf"
    assert (first["learner.actor_lr"], first["learner.critic_lr"]) == (1e-6, 5e-6)
    assert (first["rollout.profiles_per_batch"], first["learner.critic_mask"]) == (32, "response")


def test_the_7b_overlays_are_short(tmp_path: Path) -> None:
    """The eight files name their bases and the run; the shared tree lives in one base."""
    for path in QWEN.values():
        raw = read_yaml(path)
        assert set(raw) == {"base", "name", "output_dir"}, path.name
        assert raw["base"][0] == "qwen2.5-7b/base.yaml"


# --------------------------------------------------------------------------- config show
def test_every_config_field_has_a_doc() -> None:
    """Every leaf field of every section has a one-line doc in its dataclass."""
    missing = []
    for name, cls in [("", RunConfig), *((n, c) for n, c, _ in config_cli.sections())]:
        hints = typing.get_type_hints(cls)
        for field, doc in field_docs(cls).items():
            if not doc and not dataclasses.is_dataclass(hints[field]):
                missing.append(f"{name}.{field}" if name else field)
    assert not missing, f"fields without a doc: {missing}"


def test_field_docs_read_docstring_entries_and_comments() -> None:
    @dataclasses.dataclass(frozen=True)
    class Example:
        """An example.

        alpha: the first. Second sentence dropped.
        ``beta``, gamma (both): shared text; delta: a second entry
          on two lines.
        """

        alpha: int = 1
        beta: int = 2
        gamma: int = 3
        delta: int = 4
        epsilon: int = 5  # an inline comment
        # a comment block
        # above the field
        zeta: int = 6
        eta: int = 7
        """an attribute docstring"""
        theta: int = 8

    docs = field_docs(Example)
    assert docs == {
        "alpha": "the first",
        "beta": "(both) shared text",
        "gamma": "(both) shared text",
        "delta": "a second entry on two lines",
        "epsilon": "an inline comment",
        "zeta": "a comment block above the field",
        "eta": "an attribute docstring",
        "theta": "",
    }


def _show(*argv: str) -> tuple[int, list[str]]:
    lines: list[str] = []
    return config_cli.main(["show", *argv], out=lines.append), lines


def test_config_show_prints_values_defaults_docs_and_marks_changes() -> None:
    path = QWEN[("ppo", "think", "v5p")]
    rc, lines = _show("--config", str(path), "learner.actor_lr=2e-6", "seed=0")
    assert rc == 0
    text = "\n".join(lines)
    assert "qwen2.5-7b/base.yaml" in text and "# overrides: learner.actor_lr=2e-6 seed=0" in text
    by_key = {}
    section = ""
    for line in lines:
        if line.startswith("#"):
            continue
        key = line.split(":", 1)[0]
        if not line.startswith(" "):
            section = key
        by_key[f"{section}.{key.strip()}" if line.startswith("  ") else key] = line
    lr = by_key["learner.actor_lr"]
    assert lr.startswith("  actor_lr: 2.0e-06") and "# * default 1.0e-06 [command line]" in lr
    assert "the policy's learning rate" in lr
    fsdp = by_key["mesh.fsdp"]  # set by a base, equal to the default: not marked
    assert "# default -1 |" in fsdp and "devices along the fsdp axis" in fsdp
    micro = by_key["learner.micro_batch_size"]
    assert "* default 32 [configs/qwen2.5-7b/v5p.yaml]" in micro.replace(str(REPO) + "/", "")
    assert "seed: 0" in by_key["seed"] and "*" not in by_key["seed"].split("#")[1]
    assert "/path/to/Qwen2.5-7B-Instruct" in by_key["model.path"]
    assert "(path not on this machine)" in by_key["model.path"]
    # The printed tree is YAML that loads back to the same config.
    back = yaml.safe_load(text)
    assert back["learner"]["actor_lr"] == 2e-6 and back["mesh"]["fsdp"] == -1
    assert set(back) == {f.name for f in dataclasses.fields(RunConfig)}


def test_config_show_of_the_defaults_and_of_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines = _show("--defaults")
    assert rc == 0 and lines[0] == "# the defaults"
    assert not any("# *" in line for line in lines)  # nothing differs from the defaults
    rc, lines = _show("learner.actor_lrr=1")
    assert rc == 2 and not lines
    assert "config error: unknown config key learner.'actor_lrr'" in capsys.readouterr().err
    rc, _ = _show("--config", "/nowhere/x.yaml")
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_config_show_without_a_config_lists_every_section() -> None:
    rc, lines = _show()
    assert rc == 0
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    expected = {name: cls.__name__ for name, cls, _ in config_cli.sections()}
    top = {f.name for f in dataclasses.fields(RunConfig)}
    assert {n for n in expected if "." not in n} == top - {"name", "seed", "output_dir"}
    assert rows == {"(top)": "RunConfig", **expected}
    assert rows["learner"] == "LearnerConfig" and rows["user.llm"] == "LLMUserConfig"
    assert all(len(line.split(None, 2)) == 3 for line in lines[2:])  # each with a doc


def test_config_is_a_rlver_jax_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "show"]) == 0
    assert "LearnerConfig" in capsys.readouterr().out
    assert cli_main([]) == 0
    assert "config" in capsys.readouterr().out
