#!/usr/bin/env python3
"""Cloud TPU pods for rlver_jax: the exact `gcloud` commands, built from a pod description.

Standard library only (runs wherever `gcloud` does, no venv needed). The bash scripts in this
folder print the SAME commands with `--dry-run` (tests/test_tpu_scripts.py compares them), so
this module is the testable model of what they do.

    python3 tpu/pod.py create  --name rl --zone us-east5-a --accelerator v5p-32 --dry-run
    python3 tpu/pod.py install --name rl --zone us-east5-a --accelerator v5p-32 \
        --repo https://github.com/me/rlver_jax.git --dry-run
    python3 tpu/pod.py launch  --name rl --zone us-east5-a --accelerator v5p-32 \
        --config configs/qwen2.5-7b_ppo_think_v5p.yaml --output gs://my-bucket/runs/qwen7b --dry-run
    python3 tpu/pod.py logs | stop | delete ...

Topology (verified against Google's docs and xpk's system table):

- v4 / v5p names count TensorCores, 2 per chip: v5p-32 = 16 chips. Hosts have 4 chips, so
  v5p-8 is one host and v5p-32 is 4 hosts.
- v5e (v5litepod) / v6e names count chips (1 TensorCore each). Up to 8 chips fit on ONE host
  (v6e-1, v6e-4, v6e-8); larger slices use 4-chip hosts: v6e-16 = 4 hosts, v6e-256 = 64.
- v2 / v3 names count cores, 8 per host (4 chips of 2 cores).

On a pod slice every host runs the same command (`--worker=all`); `jax.distributed` detects
the slice by itself (RLVER_COORDINATOR=auto), so no addresses are passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# family -> (TensorCores per chip, max chips on a single host, chips per host in multi-host
#            slices, default runtime version, HBM GB per chip)
FAMILIES: dict[str, tuple[int, int, int, str, float]] = {
    "v2": (2, 4, 4, "tpu-ubuntu2204-base", 16.0),
    "v3": (2, 4, 4, "tpu-ubuntu2204-base", 32.0),
    "v4": (2, 4, 4, "tpu-ubuntu2204-base", 32.0),
    "v5p": (2, 4, 4, "v2-alpha-tpuv5", 95.0),
    "v5litepod": (1, 8, 4, "v2-alpha-tpuv5-lite", 16.0),
    "v6e": (1, 8, 4, "v2-alpha-tpuv6e", 32.0),
}
ALIASES = {"v5e": "v5litepod"}
DEFAULT_REMOTE_DIR = "~/rlver_jax"
TARBALL = "/tmp/rlver_jax_src.tar.gz"
REPO_ROOT = Path(__file__).resolve().parent.parent
_REMOTE_DIR_RE = re.compile(r"[~A-Za-z0-9_./-]+")  # left unquoted so that ~ expands remotely


class PodError(ValueError):
    """A pod description that cannot be turned into commands; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice type: `v5p-32` -> family v5p, 16 chips, 4 hosts of 4 chips."""

    name: str
    family: str
    chips: int
    hosts: int
    runtime_version: str
    hbm_gb_per_chip: float

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def parse_accelerator(name: str) -> Accelerator:
    """`<family>-<n>` -> chips and hosts (see the module docstring for the naming rules)."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip())
    if not match:
        raise PodError(f"accelerator {name!r}: expected <family>-<count>, e.g. v5p-32 or v6e-16")
    family = ALIASES.get(match.group(1), match.group(1))
    if family not in FAMILIES:
        raise PodError(f"accelerator {name!r}: unknown family; known: {sorted(FAMILIES)}")
    cores_per_chip, single_max, per_host, runtime, hbm = FAMILIES[family]
    count = int(match.group(2))
    if count < 1 or count % cores_per_chip:
        raise PodError(f"accelerator {name!r}: {family} counts {cores_per_chip} cores per chip")
    chips = count // cores_per_chip
    if chips <= single_max:
        hosts = 1
    elif chips % per_host:
        raise PodError(f"accelerator {name!r}: {chips} chips do not fill {per_host}-chip hosts")
    else:
        hosts = chips // per_host
    return Accelerator(name, family, chips, hosts, runtime, hbm)


@dataclasses.dataclass(frozen=True)
class Pod:
    """Where the TPU VM lives and how the project gets onto it.

    repo: a git URL cloned on every worker (at `ref`); None = copy the local working tree
      (`git ls-files` + tar; scp to every worker).
    """

    name: str
    zone: str
    accelerator: str
    project: str | None = None
    runtime_version: str | None = None
    spot: bool = False
    repo: str | None = None
    ref: str = "main"
    remote_dir: str = DEFAULT_REMOTE_DIR

    def __post_init__(self) -> None:
        for key in ("name", "zone", "accelerator"):
            if not getattr(self, key):
                raise PodError(f"pod {key} is required (--{key})")
        parse_accelerator(self.accelerator)
        if not _REMOTE_DIR_RE.fullmatch(self.remote_dir):
            raise PodError(f"remote_dir {self.remote_dir!r}: use letters, digits, ~ _ . / - only")

    @property
    def topology(self) -> Accelerator:
        return parse_accelerator(self.accelerator)

    @property
    def workers(self) -> int:
        """Number of TPU VM hosts (processes of the training job)."""
        return self.topology.hosts

    @property
    def version(self) -> str:
        return self.runtime_version or self.topology.runtime_version

    def _where(self) -> list[str]:
        out = [f"--zone={self.zone}"]
        if self.project:
            out.append(f"--project={self.project}")
        return out


Command = list[str]


def create_commands(pod: Pod) -> list[Command]:
    """`gcloud compute tpus tpu-vm create` for the whole slice (all hosts at once)."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", pod.name, *pod._where()]
    cmd += [f"--accelerator-type={pod.accelerator}", f"--version={pod.version}"]
    if pod.spot:
        cmd.append("--spot")
    return [cmd]


def ssh_command(pod: Pod, remote: str, worker: str = "all") -> Command:
    """Run the bash snippet `remote` on `worker` ("all" = every host, at the same time)."""
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", pod.name, *pod._where(),
        f"--worker={worker}", f"--command={remote}",
    ]  # fmt: skip


def _clone_script(pod: Pod) -> str:
    """Bash run on every worker (git mode): clone the repo, or update an existing clone."""
    d, repo, ref = pod.remote_dir, shlex.quote(pod.repo or ""), shlex.quote(pod.ref)
    return (
        f"if [ -d {d}/.git ]; then git -C {d} fetch --depth 1 origin {ref} && "
        f"git -C {d} checkout -f FETCH_HEAD; else git clone --depth 1 --branch {ref} {repo} {d}; fi"
    )


def install_commands(pod: Pod) -> list[Command]:
    """Put the project on every worker (git clone, or a tarball of this checkout's files that
    git does not ignore, copied with `scp --worker=all`), then run `tpu/worker_setup.sh` there
    (Python >= 3.11, `./install.sh tpu`, gcsfs for gs:// paths)."""
    cmds: list[Command] = []
    where = pod._where()
    if pod.repo is not None:
        cmds.append(ssh_command(pod, _clone_script(pod)))
    else:
        root = shlex.quote(str(REPO_ROOT))  # tracked + untracked files, minus .gitignore'd ones
        cmds.append([
            "bash", "-c", f"git -C {root} ls-files -z -co --exclude-standard | "
            f"tar -C {root} --null -T - --ignore-failed-read -czf {TARBALL}",
        ])  # fmt: skip
        cmds.append([
            "gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL, f"{pod.name}:{TARBALL}",
            *where, "--worker=all",
        ])  # fmt: skip
        unpack = f"mkdir -p {pod.remote_dir} && tar xzf {TARBALL} -C {pod.remote_dir}"
        cmds.append(ssh_command(pod, unpack))
    cmds.append(ssh_command(pod, f"bash {pod.remote_dir}/tpu/worker_setup.sh {pod.remote_dir}"))
    return cmds


def launch_commands(
    pod: Pod, config: str, output: str, overrides: Sequence[str] = ()
) -> list[Command]:
    """Start `rlver-jax train` on EVERY worker (one JAX process per host) in the background
    (`tpu/worker_train.sh`: nohup, log in <remote_dir>/train.log, pid in train.pid).

    Multi-host slices get RLVER_COORDINATOR=auto: jax.distributed finds the other hosts from
    the TPU metadata. `output` must be gs://: the hosts share no disk, and every host writes
    its own shards of each checkpoint.
    """
    if not output.startswith("gs://"):
        raise PodError(f"output {output!r}: a pod's hosts share no disk; use a gs:// path")
    env = "RLVER_COORDINATOR=auto " if pod.workers > 1 else ""
    args = " ".join(shlex.quote(a) for a in (config, output, *overrides))
    remote = f"{env}bash {pod.remote_dir}/tpu/worker_train.sh {pod.remote_dir} {args}"
    return [ssh_command(pod, remote)]


def logs_commands(pod: Pod, worker: str = "0", log: str = "train.log") -> list[Command]:
    """Follow the training log of one worker (process 0 prints metrics)."""
    return [ssh_command(pod, f"tail -n 200 -F {pod.remote_dir}/{log}", worker)]


def stop_commands(pod: Pod) -> list[Command]:
    """Stop training on every worker (the VM stays; checkpoints are in gs://)."""
    d = pod.remote_dir
    remote = f'if [ -f {d}/train.pid ]; then kill -INT "$(cat {d}/train.pid)" || true; fi'
    return [ssh_command(pod, remote)]


def delete_commands(pod: Pod) -> list[Command]:
    """Delete the TPU VM (every host); `--quiet` skips the confirmation prompt."""
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", pod.name, *pod._where(), "--quiet"]]


def format_command(cmd: Command) -> str:
    """One shell line (shlex quoting: what the bash scripts print too)."""
    return " ".join(shlex.quote(a) for a in cmd)


def run(cmds: Sequence[Command], dry_run: bool) -> int:
    """Print (dry run) or execute the commands in order; stop at the first failure."""
    for cmd in cmds:
        if dry_run:
            print(format_command(cmd))
            continue
        print(f"+ {format_command(cmd)}", file=sys.stderr)
        rc = subprocess.call(cmd)
        if rc:
            return rc
    return 0


ACTIONS = ("create", "install", "launch", "logs", "stop", "delete", "info")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpu/pod.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=ACTIONS)
    env = os.environ.get
    parser.add_argument("--name", default=env("TPU_NAME", ""), help="[TPU_NAME]")
    parser.add_argument("--zone", default=env("TPU_ZONE", ""), help="[TPU_ZONE]")
    parser.add_argument(
        "--accelerator", default=env("TPU_ACCELERATOR", ""), help="v5p-32, v6e-16, v6e-8"
    )
    parser.add_argument("--project", default=env("TPU_PROJECT") or None, help="[TPU_PROJECT]")
    parser.add_argument("--runtime-version", help="default: the family's TPU VM image")
    parser.add_argument("--spot", action="store_true")
    parser.add_argument("--repo", help="git URL to clone on the workers (default: copy)")
    parser.add_argument("--ref", default="main")
    parser.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR)
    parser.add_argument("--config", help="launch: the run config (path in the repo)")
    parser.add_argument("--output", help="launch: gs:// output_dir (checkpoints, metrics)")
    parser.add_argument("--worker", default="0", help="logs: which worker to follow")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("overrides", nargs="*", help="launch: key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        pod = Pod(
            args.name, args.zone, args.accelerator, args.project, args.runtime_version,
            args.spot, args.repo, args.ref, args.remote_dir,
        )  # fmt: skip
        if args.action == "info":
            t = pod.topology
            print(f"{t.name}: family {t.family}, {t.chips} chips, {t.hosts} hosts x "
                  f"{t.chips_per_host} chips, runtime {pod.version}, {t.hbm_gb_per_chip:g} GB "
                  "HBM per chip")  # fmt: skip
            return 0
        if args.action == "launch":
            if not args.config or not args.output:
                raise PodError("launch needs --config and --output gs://...")
            cmds = launch_commands(pod, args.config, args.output, args.overrides)
        else:
            builders = {
                "create": create_commands, "install": install_commands, "stop": stop_commands,
                "delete": delete_commands,
            }  # fmt: skip
            cmds = (
                logs_commands(pod, args.worker)
                if args.action == "logs"
                else builders[args.action](pod)
            )
    except PodError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(cmds, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
