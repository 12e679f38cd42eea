"""tpu/: the gcloud commands built by tpu/pod.py for fake pods, and the bash scripts' --dry-run
output compared with them line for line. Nothing here talks to a cloud."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rlver_jax.cli import plan as plan_cli

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
BASH = shutil.which("bash") or ""
ACTIONS = {"create": "create", "install": "setup", "launch": "launch", "logs": "logs",
           "stop": "stop", "delete": "teardown"}  # fmt: skip


def _load_pod() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tpu_pod", TPU / "pod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tpu_pod"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pod = _load_pod()

# accelerator -> (chips, hosts): v5p names count TensorCores (2 per chip) and hosts hold 4 chips;
# v5e / v6e names count chips, up to 8 on one host, 4 per host in multi-host slices.
TOPOLOGY = {
    "v5p-8": (4, 1), "v5p-16": (8, 2), "v5p-32": (16, 4), "v5p-128": (64, 16),
    "v6e-1": (1, 1), "v6e-4": (4, 1), "v6e-8": (8, 1), "v6e-16": (16, 4), "v6e-256": (256, 64),
    "v5litepod-8": (8, 1), "v5e-16": (16, 4), "v4-8": (4, 1), "v4-32": (16, 4), "v3-8": (4, 1),
}  # fmt: skip
PODS = [
    pod.Pod("rl-v5p", "us-east5-a", "v5p-32", project="proj-1"),
    pod.Pod("rl-v6e", "us-east1-d", "v6e-16", spot=True, repo="https://example.com/r.git"),
    pod.Pod("rl-one", "europe-west4-a", "v6e-8", project="p", ref="v1.2", remote_dir="~/src/rl"),
]
CONFIG, OUTPUT, OVERRIDES = "configs/qwen.yaml", "gs://bucket/runs/q7", ["trainer.steps=5", "a=b c"]


@pytest.mark.parametrize(("name", "expected"), TOPOLOGY.items())
def test_topology(name: str, expected: tuple[int, int]) -> None:
    acc = pod.parse_accelerator(name)
    assert (acc.chips, acc.hosts) == expected
    assert acc.chips_per_host == (expected[0] if expected[1] == 1 else 4)


@pytest.mark.parametrize("name", ["v5p-7", "x9-8", "v6e", "v6e-12x", "v7q-8"])
def test_bad_accelerators(name: str) -> None:
    with pytest.raises(pod.PodError):
        pod.parse_accelerator(name)


@pytest.mark.parametrize("name", [n for n in TOPOLOGY if not n.startswith("v3")])
def test_plan_devices_agree_with_pod(name: str) -> None:
    """`rlver-jax plan --accelerator` counts one JAX device per chip (v4 and later)."""
    kind, devices = plan_cli.accelerator_devices(name)
    assert devices == pod.parse_accelerator(name).chips
    assert plan_cli.DEVICE_MEMORY_GB[kind] == pod.parse_accelerator(name).hbm_gb_per_chip


def test_runtime_versions() -> None:
    assert pod.Pod("a", "z", "v5p-32").version == "v2-alpha-tpuv5"
    assert pod.Pod("a", "z", "v6e-16").version == "v2-alpha-tpuv6e"
    assert pod.Pod("a", "z", "v5e-16").version == "v2-alpha-tpuv5-lite"
    assert pod.Pod("a", "z", "v4-32").version == "tpu-ubuntu2204-base"
    assert pod.Pod("a", "z", "v6e-8", runtime_version="custom").version == "custom"


def test_generated_commands() -> None:
    p = PODS[0]
    (create,) = pod.create_commands(p)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--zone=us-east5-a", "--project=proj-1", "--accelerator-type=v5p-32",
            "--version=v2-alpha-tpuv5"} <= set(create)  # fmt: skip
    install = pod.install_commands(p)
    assert [c[0] for c in install] == ["bash", "gcloud", "gcloud", "gcloud"]  # copy mode
    assert "ls-files" in install[0][2] and pod.TARBALL in install[0][2]
    assert all("--worker=all" in c for c in install[1:])
    assert install[-1][-1] == "--command=bash ~/rlver_jax/tpu/worker_setup.sh ~/rlver_jax"
    (launch,) = pod.launch_commands(p, CONFIG, OUTPUT, OVERRIDES)
    assert "--worker=all" in launch
    remote = launch[-1].removeprefix("--command=")
    assert remote.startswith("RLVER_COORDINATOR=auto bash ~/rlver_jax/tpu/worker_train.sh ")
    assert shlex.split(remote)[-4:] == [CONFIG, OUTPUT, *OVERRIDES]
    (logs,) = pod.logs_commands(p)
    assert "--worker=0" in logs and logs[-1].endswith("/train.log")
    (delete,) = pod.delete_commands(p)
    assert delete[4:6] == ["delete", "rl-v5p"] and "--quiet" in delete


def test_git_install_single_host_launch_and_gs_output() -> None:
    clone = pod.install_commands(PODS[1])[0]
    assert "--worker=all" in clone and "git clone --depth 1 --branch main" in clone[-1]
    assert "https://example.com/r.git" in clone[-1]
    assert "--spot" in pod.create_commands(PODS[1])[0]
    (launch,) = pod.launch_commands(PODS[2], CONFIG, OUTPUT)  # v6e-8: one host
    assert "RLVER_COORDINATOR" not in launch[-1] and "--worker=all" in launch
    assert "~/src/rl/tpu/worker_train.sh ~/src/rl " in launch[-1]
    with pytest.raises(pod.PodError, match="gs://"):
        pod.launch_commands(PODS[2], CONFIG, "runs/local")


def _args(p: Any) -> list[str]:
    args = ["--name", p.name, "--zone", p.zone, "--accelerator", p.accelerator]
    if p.project:
        args += ["--project", p.project]
    if p.spot:
        args.append("--spot")
    if p.repo:
        args += ["--repo", p.repo]
    args += ["--ref", p.ref, "--remote-dir", p.remote_dir]
    return [*args, "--config", CONFIG, "--output", OUTPUT, "--dry-run", *OVERRIDES]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.skipif(not BASH, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    assert _run([BASH, "-n", str(script)]).returncode == 0


@pytest.mark.skipif(not BASH, reason="needs bash")
@pytest.mark.parametrize("p", PODS, ids=lambda p: p.accelerator)
@pytest.mark.parametrize("action", ACTIONS)
def test_bash_dry_run_matches_pod_py(p: Any, action: str) -> None:
    args = _args(p)
    bash = _run([BASH, str(TPU / f"{ACTIONS[action]}.sh"), *args])
    py = _run([sys.executable, str(TPU / "pod.py"), action, *args])
    assert bash.returncode == 0 and py.returncode == 0, bash.stderr + py.stderr
    assert bash.stdout == py.stdout and bash.stdout.strip()
    expected = {
        "create": pod.create_commands, "install": pod.install_commands,
        "stop": pod.stop_commands, "delete": pod.delete_commands,
        "logs": lambda q: pod.logs_commands(q),
        "launch": lambda q: pod.launch_commands(q, CONFIG, OUTPUT, OVERRIDES),
    }[action](p)  # fmt: skip
    assert [shlex.split(line) for line in bash.stdout.splitlines()] == expected


@pytest.mark.skipif(not BASH, reason="needs bash")
def test_bash_env_defaults_and_errors() -> None:
    env = {"TPU_NAME": "envpod", "TPU_ZONE": "us-central2-b", "TPU_ACCELERATOR": "v6e-16"}
    bash = _run([BASH, str(TPU / "create.sh"), "--dry-run"], env)
    py = _run([sys.executable, str(TPU / "pod.py"), "create", "--dry-run"], env)
    assert bash.stdout == py.stdout and "envpod --zone=us-central2-b" in bash.stdout
    assert "16 chips on 4 host(s)" in bash.stderr
    local = ["--name", "a", "--zone", "z", "--accelerator", "v5p-32", "--config", CONFIG,
             "--output", "/tmp/out", "--dry-run"]  # fmt: skip
    assert _run([BASH, str(TPU / "launch.sh"), *local]).returncode == 2
    assert _run([sys.executable, str(TPU / "pod.py"), "launch", *local]).returncode == 2
    bad = ["--name", "a", "--zone", "z", "--accelerator", "v9-8", "--dry-run"]
    assert _run([BASH, str(TPU / "create.sh"), *bad]).returncode == 2


@pytest.mark.skipif(not BASH, reason="needs bash")
def test_worker_scripts_dry_run(tmp_path: Path) -> None:
    train = _run([BASH, str(TPU / "worker_train.sh"), "--dry-run", str(tmp_path), CONFIG, OUTPUT,
                  "x=1"], {"RLVER_COORDINATOR": "auto"})  # fmt: skip
    assert train.returncode == 0
    assert train.stdout.startswith("RLVER_COORDINATOR=auto nohup .venv/bin/rlver-jax train ")
    assert f"--config {CONFIG} output_dir={OUTPUT} x=1" in train.stdout
    setup = _run([BASH, str(TPU / "worker_setup.sh"), "--dry-run", str(ROOT)])
    assert setup.returncode == 0 and "./install.sh tpu" in setup.stdout
    assert "pip install -q gcsfs" in setup.stdout


@pytest.mark.skipif(not BASH, reason="needs bash")
def test_gpu_multinode_dry_run() -> None:
    gpu = [BASH, str(TPU / "gpu_multinode.sh"), "--config", CONFIG, "--dry-run"]
    ssh = _run([*gpu, "--hosts", "gpu0,gpu1,gpu2", "--output", "/shared/run", "--port", "1234",
                "k=v"])  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr
    lines = [shlex.split(line) for line in ssh.stdout.splitlines()]
    assert [line[:2] for line in lines] == [["ssh", "gpu0"], ["ssh", "gpu1"], ["ssh", "gpu2"]]
    for i, line in enumerate(lines):
        remote = line[2]
        assert f"RLVER_COORDINATOR=gpu0:1234 RLVER_NUM_PROCESSES=3 RLVER_PROCESS_ID={i} " in remote
        assert "rlver-jax train --config configs/qwen.yaml output_dir=/shared/run k=v" in remote
    slurm = _run([*gpu, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--output", OUTPUT])
    (cmd,) = [shlex.split(line) for line in slurm.stdout.splitlines()]
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"]
    assert "RLVER_COORDINATOR=auto exec" in cmd[-1] and f"output_dir={OUTPUT}" in cmd[-1]
    assert _run([*gpu, "--output", "x"]).returncode == 2  # neither --hosts nor --slurm
