"""A partitioned run on a Ray cluster (the optional `ray` extra): one task per part, Ray's task
retries for lost workers and nodes, then the merge on the driver.

Every task resumes what an earlier attempt of its part journaled (SRC and OUT are on storage all
nodes see), so a retried part redoes only its unfinished shards. Ray is imported only here.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable

from ..errors import FP8ConvError, MissingExtra, OutputError, SchemeError
from ..io.outdir import Staging
from .partition import Partition
from .pipeline import ConversionResult, RunOptions, merge_parts, plan_recipe, run_plan
from ..plan.recipe import Recipe
from ..io.untrusted import printable

TASK_RETRIES = 3
CONNECT_TIMEOUT_S = 5.0  # one TCP connect to the cluster's address before Ray starts (Ray itself retries for minutes)


def check_address(address: str | None) -> None:
    """Refuse a --ray ADDRESS (or RAY_ADDRESS) that is not HOST:PORT, ray://HOST:PORT, auto or local, or
    where nothing accepts a TCP connection, with one line (SchemeError, exit 2) before Ray is started."""
    given = address or os.environ.get("RAY_ADDRESS") or ""
    label = f"--ray {given!r}" if address else f"RAY_ADDRESS {given!r}"
    if given in ("", "auto", "local"):
        return
    rest = given[len("ray://"):] if given.startswith("ray://") else given
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isascii() or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise SchemeError(f"{printable(label)} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, UnicodeError) as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or str(exc))
        raise SchemeError(f"{printable(label)}: no Ray cluster answers there ({printable(str(reason))}); start one with "
                          "`ray start --head`, or give no address to start a local one") from None


def convert_part(source: str, out: str, recipe: dict, index: int, count: int, workers: int,
                 overwrite: bool) -> list[str]:
    """The body of one Ray task: part index/count of the run, resumed if an earlier attempt left it."""
    plan_of = Recipe.from_json(recipe, "Ray task")
    checkpoint, plan = plan_recipe(Path(source), plan_of)
    options = RunOptions(workers, overwrite, True, plan_of.allow_nonfinite)
    return run_plan(checkpoint, plan, Path(source), Path(out), options, partition=Partition(index, count),
                    recipe=plan_of).shards


def run_on_ray(source: Path, out: Path, recipe: Recipe, parts: int, options: RunOptions, address: str | None,
               on_part: Callable[[str], object] | None = None, retries: int = TASK_RETRIES) -> ConversionResult:
    """Submit `parts` tasks (each asking Ray for options.workers CPUs), wait, then merge into OUT."""
    try:
        import ray
    except ImportError:
        raise MissingExtra("--ray needs Ray, which is not installed: pip install 'fp8conv[ray]'") from None
    check_address(address)
    Staging(out, source, options.overwrite, True, "").check()  # refuse a non-empty OUT before any work
    src, dst = os.path.abspath(source), os.path.abspath(out)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(max_retries=retries, retry_exceptions=False, num_cpus=options.workers)(convert_part)
        pending = {task.remote(src, dst, recipe.to_json(), i, parts, options.workers, options.overwrite):
                   Partition(i, parts) for i in range(1, parts + 1)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            part = pending.pop(done[0])
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, FP8ConvError):
                    raise cause from None
                raise OutputError(f"part {part.label} failed on Ray ({type(cause or exc).__name__}: {cause or exc})") from None
            except ray.exceptions.RayError as exc:
                raise OutputError(f"part {part.label} failed on Ray after {retries} retries "
                                  f"({type(exc).__name__}); rerun to continue from the finished parts") from None
            if on_part is not None:
                on_part(part.label)
    finally:
        ray.shutdown()
    return merge_parts(Path(dst), Path(src), options.overwrite)
