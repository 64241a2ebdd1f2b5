"""What a run was asked to do (validated options) and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io.safetensors import READ_CHUNK_BYTES
from ..layouts import DEFAULT_LAYOUT
from ..plan.records import ConversionPlan
from ..plan.scheme import Scheme
from .partition import Partition

Progress = Callable[[int], None]
JOB_BYTES = 64 << 20  # larger matrices are split into row ranges shared by the workers
STACK_BYTES = 16 << 20  # smaller matrices of a 3-D stack are grouped into jobs of about this size


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan: parallelism, what to do with an existing output, and the memory knobs
    (rows are read in chunks of about chunk_bytes; matrices over job_bytes are split into row-range
    jobs that workers share). The tensors' bytes depend on none of them. The report's float64
    error sums are merged chunk by chunk and job by job, so their last bits depend on chunk_bytes
    and job_bytes (module constants, not CLI options: every run, any --workers or --partition, uses
    the same ones); workers and backend change nothing."""

    workers: int = 1
    overwrite: bool = False
    resume: bool = False
    allow_nonfinite: bool = False
    chunk_bytes: int = READ_CHUNK_BYTES
    job_bytes: int = JOB_BYTES
    stack_bytes: int = STACK_BYTES  # smaller matrices of a 3-D stack are grouped into jobs of about this size
    backend: str = "auto"  # kernels: auto (FP8CONV_BACKEND, else native where built), numpy or native


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `fp8conv quantize` was asked to do, validated: what to produce, and how to run."""

    scheme: Scheme = field(default_factory=Scheme)
    layout: str = DEFAULT_LAYOUT
    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_shard_size: int | None = None
    run: RunOptions = field(default_factory=RunOptions)
    tp: int = 1
    engines: tuple[str, ...] = ()  # engines whose load constraints refuse the conversion (others warn)
    schemes: tuple[tuple[str, Scheme], ...] = ()  # --scheme PATTERN=SPEC overrides, first match wins


@dataclass
class ConversionResult:
    """A finished OUT (report set), or a finished part of a partitioned run (part and shards set); a merge also
    says what its parts ran (the recipe's command) and from which SRC, for the model card."""

    plan: ConversionPlan
    report: dict
    out: Path
    config_updated: bool
    notes: list[str]
    part: Partition | None = None
    shards: list[str] = field(default_factory=list)
    command: str | None = None
    source: Path | None = None
