"""How a run is scheduled on one machine: job order, default worker count, writeback, prefix hashing.
None of it may change an output byte (tests/test_golden_bytes.py and the --workers tests check that)."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import stfile
from fp8conv.accel import native
from fp8conv.io import hashing, outdir
from fp8conv.run import cpus, jobs, pipeline
from fp8conv.run.work import CopyJob, Job, QuantizeJob, Source, WriteJob
from helpers import run_cli


KINDS = {"copy": CopyJob, "write": WriteJob, "quantize": QuantizeJob}


def job(kind: str, shard: str, offset: int) -> Job:
    return KINDS[kind](f"{shard}@{offset}", Source("", 0, ""), shard, offset, 10)


def kind_of(job: Job) -> str:
    return next(kind for kind, cls in KINDS.items() if type(job) is cls)


def test_kernel_free_jobs_go_first_in_their_wave_and_the_rest_keep_their_order():
    shards = {f"s{i}": [job("quantize", f"s{i}", 0), job("copy", f"s{i}", 100), job("quantize", f"s{i}", 200),
                        job("write", f"s{i}", 300)] for i in range(pipeline.INTERLEAVED_SHARDS + 1)}
    order = pipeline._interleave(shards, {name: 400 for name in shards})
    first_wave = [(s, j) for s, j in order[:4 * pipeline.INTERLEAVED_SHARDS]]
    kinds = [kind_of(j) for _, j in first_wave]
    free = 2 * pipeline.INTERLEAVED_SHARDS
    assert set(kinds[:free]) == {"copy", "write"} and set(kinds[free:]) == {"quantize"}
    # within the wave, converting jobs stay interleaved by relative file position (the merge order of statistics)
    assert [(s, j.dst_offset) for s, j in first_wave[free:]] == [
        (f"s{i}", offset) for offset in (0, 200) for i in range(pipeline.INTERLEAVED_SHARDS)]
    # the next wave (one shard) starts only after the whole first wave, its copy and constant first
    last = pipeline.INTERLEAVED_SHARDS
    assert [(s, kind_of(j), j.dst_offset) for s, j in order[4 * last:]] == [
        (f"s{last}", "copy", 100), (f"s{last}", "write", 300), (f"s{last}", "quantize", 0), (f"s{last}", "quantize", 200)]


@pytest.mark.parametrize("cpus, shards, expected", [
    (1, 1, 1), (2, 1, 2), (2, 9, 2),  # never more workers than CPUs, at least 2 where there are 2
    (4, 2, 2), (8, 1, 6), (8, 2, 4), (8, 9, 4),  # never below half the CPUs
    (16, 1, 14), (16, 2, 12), (16, 3, 10), (16, 4, 8), (16, 40, 8),  # two CPUs per shard hashed at a time (up to 4)
    (64, 2, 60), (64, 40, 56),
])
def test_default_workers_where_the_cpu_is_the_limit(cpus, shards, expected):
    assert pipeline.default_workers(shards, cpus) == expected


@pytest.mark.parametrize("cpus, shards, expected", [
    (1, 1, 1), (2, 1, 2), (2, 9, 2), (3, 1, 2), (4, 2, 4),
    (16, 1, 2), (16, 2, 4), (16, 3, 6), (16, 4, 8), (16, 40, 8),  # two workers per shard hashed at a time (up to 4)
    (64, 2, 4), (64, 40, 8),
])
def test_default_workers_where_the_hashing_is_the_limit(cpus, shards, expected):
    assert pipeline.default_workers(shards, cpus, hash_bound=True) == expected


@pytest.mark.parametrize("options, expected", [
    ((), 6),  # FP8 block min-max: the compiled kernel, hash-bound: 2 per shard hashed side by side
    (("--format", "int8", "--granularity", "channel"), 6),
    (("--format", "int4", "--asymmetric", "--observer", "hqq"), 10),  # the CPU is the limit: every CPU but two per hashed shard
    (("--format", "nvfp4"), 10),
])
def test_cli_default_workers_follow_the_plan(monkeypatch, tmp_path, options, expected):
    from helpers import run_cli
    from test_reliability import sharded_model

    seen = []
    real = pipeline.run_plan

    def run_plan(checkpoint, plan, src, out, options, *rest):
        seen.append(options.workers)
        return real(checkpoint, plan, src, out, replace(options, workers=2), *rest)

    monkeypatch.setattr(pipeline, "available_cpus", lambda: 16)
    monkeypatch.setattr(pipeline, "run_plan", run_plan)
    run_cli("quantize", str(sharded_model(tmp_path / "src", shards=3, rows=128, cols=128)), "-o", str(tmp_path / "out"),
            "-q", *options)
    assert seen == [expected]  # 16 CPUs, 3 shards hashed side by side


def test_hash_bound_needs_the_compiled_kernel(monkeypatch):
    from fp8conv.plan.scheme import Scheme

    plan = SimpleNamespace(schemes={"w": Scheme()}, scheme=Scheme())
    if not native.AVAILABLE:
        pytest.fail(f"the C extension is not built ({native.IMPORT_ERROR}): pip install -e .")
    assert pipeline.hash_bound(plan)
    monkeypatch.setenv("FP8CONV_BACKEND", "numpy")  # the numpy path: CPU-bound
    assert not pipeline.hash_bound(plan)
    monkeypatch.delenv("FP8CONV_BACKEND")
    assert not pipeline.hash_bound(SimpleNamespace(schemes={}, scheme=None))
    assert not pipeline.hash_bound(SimpleNamespace(schemes={"w": Scheme("int4", "group")}, scheme=None))


def test_available_cpus_reads_the_affinity_mask_and_the_cgroup_quota(tmp_path, monkeypatch):
    """taskset / Slurm (affinity) and containers (cgroup v2 cpu.max, v1 cfs quota, on the process's own
    cgroup or an ancestor) each cap the CPUs; os.cpu_count() (the machine's) is never the answer."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "job" / "step").mkdir(parents=True)
    proc.write_text("0::/job/step\n")
    assert cpus.available_cpus(proc, root) == 8  # no cpu.max: the affinity mask
    (root / "job" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs on the parent cgroup
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cpus.available_cpus(proc, root) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5})
    assert cpus.available_cpus(proc, root) == 2
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker\n3:cpu,cpuacct:/docker\n")
    assert cpus.available_cpus(proc, v1) == 1
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.available_cpus(proc, v1) == 2
    assert cpus.available_cpus(tmp_path / "missing", root) == 2


def test_writeback_requests_leave_the_bytes_alone_and_survive_a_vanished_file(tmp_path):
    path = tmp_path / "shard.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert outdir.start_writeback(fd, 0, len(data)) == (outdir._SYNC_FILE_RANGE is not None)
        assert outdir.start_writeback(fd, 10, 10) is False  # empty range: nothing asked
    finally:
        os.close(fd)
    writeback = outdir.Writeback()
    writeback.written(path, 0, 1 << 20)
    writeback.written(tmp_path / "gone.bin", 0, 100)  # advisory: a missing file is no error
    writeback.written(path, 1 << 20, len(data))
    for i in range(3 * outdir.Writeback.MAX_OPEN):  # many shards: its open files stay few
        other = tmp_path / f"other-{i}.bin"
        other.write_bytes(b"x" * 100)
        writeback.written(other, 0, 100)
    writeback._thread.submit(lambda: None).result()  # wait for the requests made so far
    assert len(writeback._fds) <= outdir.Writeback.MAX_OPEN
    writeback.close()
    assert writeback._fds == {}
    assert path.read_bytes() == data


def test_writeback_drops_hashed_ranges_on_its_thread_and_ignores_requests_after_close(tmp_path, monkeypatch):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"y" * (2 << 20))
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(outdir.os, "posix_fadvise",
                        lambda fd, start, length, advice: calls.append((start, length, advice)) or real(fd, start, length, advice))
    writeback = outdir.Writeback()
    hasher = hashing.PrefixHasher(path, 2 << 20, writeback.hashed)
    hasher.written(0, 1 << 20)
    hasher.written(1 << 20, 2 << 20)
    writeback._thread.submit(lambda: None).result()
    assert calls == [(0, 1 << 20, os.POSIX_FADV_DONTNEED), (1 << 20, 1 << 20, os.POSIX_FADV_DONTNEED)]
    writeback.close()
    writeback.hashed(path, 0, 10)  # a hashing thread finishing after the run's writeback closed
    writeback.written(path, 0, 10)
    assert len(calls) == 2 and writeback._fds == {}
    assert hasher.hexdigest() == hashlib.sha256(b"y" * (2 << 20)).hexdigest()


@pytest.mark.parametrize("window", [hashing.WINDOW_BYTES, 2 * mmap.ALLOCATIONGRANULARITY])
def test_prefix_hasher_out_of_order_ranges_across_window_boundaries(tmp_path, monkeypatch, window):
    monkeypatch.setattr(hashing, "WINDOW_BYTES", window)
    path = tmp_path / "out.bin"
    size = 3 * window + 12345
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    hasher = hashing.PrefixHasher(path, size)
    cuts = [0, 7, window - 1, window + 5, 2 * window + 3, 2 * window + 4, size]
    ranges = list(zip(cuts, cuts[1:]))
    for start, end in reversed(ranges[1:]):
        hasher.written(start, end)
        assert hasher.position == 0  # nothing contiguous from 0 yet
    hasher.written(*ranges[0])
    assert hasher.position == size
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hasher._fd is None  # closed once the shard is hashed
    # In order, one range at a time: every window starts at an unaligned position.
    hasher = hashing.PrefixHasher(path, size)
    for start, end in ranges:
        hasher.written(start, end)
        assert hasher.position == end
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_prefix_hasher_refuses_a_file_shorter_than_its_ranges(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"x" * 100)
    hasher = hashing.PrefixHasher(path, 200)
    with pytest.raises(OSError, match="shorter than expected"):
        hasher.written(0, 200)  # an error, never a SIGBUS from a mapped page past the end
    os.close(hasher._fd)


def test_prefix_hasher_holds_no_descriptor_before_it_hashes(tmp_path):
    hashers = [hashing.PrefixHasher(Path(tmp_path / f"{i}.bin"), 10) for i in range(1000)]
    assert all(h._fd is None for h in hashers)  # a 1000-shard plan makes 1000 hashers up front


@pytest.mark.parametrize("options", [[], ["--granularity", "channel"], ["--format", "int8"],
                                     ["--granularity", "tensor"], ["--format", "fp8_e5m2", "--block-size", "64x128", "--layout", "fp8conv"],
                                     ["--format", "int8", "--granularity", "group", "--group-size", "128"],
                                     ["--format", "nvfp4"], ["--format", "mxfp4"], ["--format", "mxfp8"]])
def test_kernel_pieces_give_the_bytes_and_report_of_whole_chunks(tmp_path, monkeypatch, options):
    """The compiled kernel reads a chunk in pieces and carries its sums: every output file, the
    report's float sums and the manifest included, equals that of whole-chunk calls."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((1000, 1536)) * 0.02).astype(np.float32)
    w[:, ::97] *= 30  # heavy columns: scales differ from tile to tile
    stfile.write(src / "model.safetensors", {"layers.0.proj.weight": stfile.entry("BF16", [1000, 1536], 0, w.size * 2)},
                 w.astype(ml_dtypes.bfloat16).tobytes())
    (src / "config.json").write_text('{"model_type": "llama"}')
    outputs = {}
    calls = []
    real = jobs.quantize_rows_into
    monkeypatch.setattr(jobs, "quantize_rows_into", lambda *args: calls.append(args[0].shape) or real(*args))
    for label, piece in (("pieces", 64 << 10), ("whole", 1 << 40)):
        monkeypatch.setattr(jobs, "PIECE_BYTES", piece)
        out = tmp_path / label
        run_cli("quantize", str(src), "-o", str(out), "-q", "--workers", "1", *options)
        # README.md, the model card, names OUT in its title and command: the other files must be identical.
        outputs[label] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "README.md"}
        if label == "pieces":
            assert len(calls) >= 8 and sum(shape[0] for shape in calls) == 1000  # the chunk went in pieces
            pieces = len(calls)
    assert len(calls) == pieces  # the whole-chunk run made no piece calls
    assert outputs["pieces"].keys() == outputs["whole"].keys()
    for name in outputs["whole"]:
        assert outputs["pieces"][name] == outputs["whole"][name], name


def test_kernel_pieces_hand_a_chunk_with_nan_to_the_numpy_path(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    w = (np.random.default_rng(3).standard_normal((512, 1024)) * 0.02).astype(np.float32)
    w[300, 5] = np.nan  # in the third 64 KiB piece of the only chunk
    stfile.write(src / "model.safetensors", {"layers.0.proj.weight": stfile.entry("BF16", [512, 1024], 0, w.size * 2)},
                 w.astype(ml_dtypes.bfloat16).tobytes())
    (src / "config.json").write_text('{"model_type": "llama"}')
    outputs = {}
    for label, piece in (("pieces", 64 << 10), ("whole", 1 << 40)):
        monkeypatch.setattr(jobs, "PIECE_BYTES", piece)
        out = tmp_path / label
        run_cli("quantize", str(src), "-o", str(out), "-q", "--workers", "1", "--allow-nonfinite")
        # README.md, the model card, names OUT in its title and command: the other files must be identical.
        outputs[label] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "README.md"}
    assert outputs["pieces"] == outputs["whole"]
    report = json.loads(outputs["pieces"]["fp8conv.report.json"])
    [row] = [row for row in report["tensors"] if row["name"] == "layers.0.proj.weight"]
    assert row["nonfinite_values"] == 1
