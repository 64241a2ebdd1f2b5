"""How many CPUs this process may use: its affinity mask (taskset, Slurm, numactl) capped by its cgroup's
CPU quota (containers, systemd, Kubernetes limits). os.cpu_count() counts the machine's, which starts 16
workers for a job given 2 CPUs of a 16-core host."""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int:
    """min(CPUs in the affinity mask, ceil(cgroup quota / period)), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(proc_cgroup, root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup and its ancestors, v2 (cpu.max) or v1
    (cpu.cfs_quota_us / cpu.cfs_period_us); None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            limits += [_v2_limit(folder / "cpu.max") for folder in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            base = next((root / name for name in (controllers, "cpu,cpuacct", "cpu") if (root / name).is_dir()), None)
            if base is not None:
                limits += [_v1_limit(folder) for folder in _ancestors(base, path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and every folder above it up to base (a container sees its own cgroup as "/")."""
    folders = [base]
    for part in [p for p in path.strip("/").split("/") if p and p != ".."]:
        folders.append(folders[-1] / part)
    return [f for f in folders if f.is_dir()]


def _v2_limit(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
