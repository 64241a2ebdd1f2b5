"""--partition I/N and merge: any N, any order, byte-identical to one run; refusals name the part."""
from __future__ import annotations

import json
import random
import re
import shutil
import signal

import pytest

from conftest import tree_digest
from fp8conv.plan.records import OutShard
from fp8conv.run.partition import assign
from fp8conv.io.safetensors import OutEntry
from helpers import run_cli
from test_reliability import run_hooked, sharded_model

SHARDS = ["--max-shard-size", "200KB"]  # llama-tiny -> 10 output shards of unequal sizes


def parts_of(out):
    return out.parent / f".{out.name}.fp8conv-parts"


def assert_merged_cleanly(out):
    assert out.is_dir()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"left behind: {leftovers}"


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_quantize_parts_merged_equal_one_run(sample, tmp_path, count):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "single", *SHARDS, "--workers", "2", "-q")
    order = list(range(1, count + 1))
    random.Random(count).shuffle(order)
    for index in order:
        result = run_cli("quantize", src, "-o", tmp_path / "merged", *SHARDS, "--partition", f"{index}/{count}",
                         "--workers", "1", "-q")
        assert f"part {index}/{count} done" in result.stdout
        assert not (tmp_path / "merged").exists()
    run_cli("merge", tmp_path / "merged")
    assert tree_digest(tmp_path / "merged") == tree_digest(tmp_path / "single")
    assert_merged_cleanly(tmp_path / "merged")


def test_mixed_scheme_parts_merged_equal_one_run(sample, tmp_path):
    """--scheme overrides change the output bytes, so the recipe each part records must carry them."""
    src = sample("llama-tiny")
    mixed = ["--scheme", "re:.*down_proj=int8:channel", "--scheme", "re:.*self_attn.*=fp8_e4m3:channel"]
    run_cli("quantize", src, "-o", tmp_path / "single", *SHARDS, *mixed, "-q")
    for index in (2, 1):
        run_cli("quantize", src, "-o", tmp_path / "merged", *SHARDS, *mixed, "--partition", f"{index}/2", "-q")
    run_cli("merge", tmp_path / "merged")
    assert tree_digest(tmp_path / "merged") == tree_digest(tmp_path / "single")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert len(config["quantization_config"]["config_groups"]) == 3


def test_dequantize_parts_merged_equal_one_run(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "fp8", *SHARDS, "-q")
    run_cli("dequantize", tmp_path / "fp8", "-o", tmp_path / "single", "-q")
    for index in (3, 1, 2):
        run_cli("dequantize", tmp_path / "fp8", "-o", tmp_path / "merged", "--partition", f"{index}/3", "-q")
    run_cli("merge", tmp_path / "merged", "--json")
    assert tree_digest(tmp_path / "merged") == tree_digest(tmp_path / "single")
    # dequantize copies SRC's README.md (here the fp8 output's card) unchanged; so does the merge
    assert (tmp_path / "merged" / "README.md").read_bytes() == (tmp_path / "fp8" / "README.md").read_bytes()


def test_merge_writes_the_model_card_of_one_run(sample, tmp_path):
    """The merged OUT gets the card a single run writes: same sections, SRC's README kept below, the manifest's
    digest quoted (verify passes), the merge command as provenance; --no-card copies SRC's README instead."""
    from fp8conv.report.card import ORIGINAL_MARKER, card_digest_matches, split_front_matter

    src = tmp_path / "with-card"
    shutil.copytree(sample("llama-tiny"), src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny llama\n\nThe source's own card.\n")
    run_cli("quantize", src, "-o", tmp_path / "single", *SHARDS, "-q")
    for no_card, out in ((False, tmp_path / "merged"), (True, tmp_path / "plain")):
        for index in (2, 1):
            run_cli("quantize", src, "-o", out, *SHARDS, "--partition", f"{index}/2", "-q")
        run_cli("merge", out, *(["--no-card"] if no_card else []))
    keys, body = split_front_matter((tmp_path / "merged" / "README.md").read_text())
    single_keys, single_body = split_front_matter((tmp_path / "single" / "README.md").read_text())
    assert keys["fp8conv_command"] == f"fp8conv merge {tmp_path / 'merged'}" and keys["license"] == "apache-2.0"
    assert {k: v for k, v in keys.items() if k != "fp8conv_command"} == \
        {k: v for k, v in single_keys.items() if k != "fp8conv_command"}
    assert card_digest_matches(tmp_path / "merged") is True
    section = re.compile(r"## What was done.*?## Provenance", re.S)
    assert section.search(body).group(0) == section.search(single_body).group(0)
    assert body.split(ORIGINAL_MARKER)[1] == single_body.split(ORIGINAL_MARKER)[1]
    assert "The source's own card." in body.split(ORIGINAL_MARKER)[1]
    verify = json.loads(run_cli("verify", tmp_path / "merged", "--json", "-q").stdout)
    assert verify["passed"], verify["findings"]
    assert (tmp_path / "plain" / "README.md").read_bytes() == (src / "README.md").read_bytes()


def test_assign_whole_shards_balanced_by_bytes():
    sizes = [700, 100, 300, 300, 250, 50, 900, 10]
    shards = [OutShard(f"s{i}", [OutEntry(f"t{i}", "U8", (size,))]) for i, size in enumerate(sizes)]
    for count in (1, 2, 3, 7, 12):
        parts = assign(shards, count)
        assert len(parts) == count
        assert sorted(n for part in parts for n in part) == sorted(s.name for s in shards)
        loads = [sum(sizes[int(n[1:])] for n in part) for part in parts]
        # greedy largest-first: a part exceeds the lightest one by at most one shard's size
        assert max(loads) - min(loads) <= max(sizes)
        assert parts == assign(list(shards), count)
    assert assign(shards, 2) == [["s1", "s3", "s6", "s7"], ["s0", "s2", "s4", "s5"]]  # 1310 / 1300 bytes


def test_missing_part_refused_by_name(sample, tmp_path):
    src = sample("llama-tiny")
    for index in (1, 3):
        run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", f"{index}/3", "-q")
    result = run_cli("merge", tmp_path / "out", expect=3)
    assert result.stderr.startswith("fp8conv: error: part 2/3 (")
    assert "part-00002-of-00003) is missing; run it with --partition 2/3" in result.stderr
    assert not (tmp_path / "out").exists()


def test_foreign_part_refused_by_name(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", "1/2", "-q")
    run_cli("quantize", src, "-o", tmp_path / "other", *SHARDS, "--format", "int8", "--partition", "2/2", "-q")
    parts_of(tmp_path / "other").joinpath("part-00002-of-00002").rename(
        parts_of(tmp_path / "out") / "part-00002-of-00002")
    result = run_cli("merge", tmp_path / "out", expect=3)
    assert "part-00002-of-00002 is foreign: written by another run" in result.stderr
    assert not (tmp_path / "out").exists()


def test_part_of_another_count_is_foreign(sample, tmp_path):
    src = sample("llama-tiny")
    for part in ("1/2", "2/2", "1/3"):
        run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", part, "-q")
    result = run_cli("merge", tmp_path / "out", expect=3)
    assert "part-00001-of-00003 is foreign" in result.stderr


def test_merge_refuses_a_changed_source(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", "1/1", "-q")
    other = sample("moe-tiny")
    result = run_cli("merge", tmp_path / "out", "--source", other, expect=3)
    assert "is not the source the parts" in result.stderr


def test_finished_part_is_kept_and_its_record_is_host_independent(sample, tmp_path):
    src = sample("llama-tiny")
    run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", "2/3", "-q")
    folder = parts_of(tmp_path / "out") / "part-00002-of-00003"
    before = tree_digest(folder)
    again = run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", "2/3", "-q")
    assert "part 2/3 was already finished" in again.stderr
    assert tree_digest(folder) == before
    # The run identity must not depend on where SRC is mounted or when it was written.
    moved = tmp_path / "elsewhere" / "llama"
    moved.parent.mkdir()
    src.rename(moved)
    (moved / "config.json").touch()
    run_cli("quantize", moved, "-o", tmp_path / "out", *SHARDS, "--partition", "1/3", "-q")
    run_cli("quantize", moved, "-o", tmp_path / "out", *SHARDS, "--partition", "3/3", "-q")
    record = json.loads((folder / "fp8conv.part.json").read_text())
    assert record["run_key"] == json.loads(
        (parts_of(tmp_path / "out") / "part-00001-of-00003" / "fp8conv.part.json").read_text())["run_key"]
    run_cli("merge", tmp_path / "out", "--source", moved)
    moved.rename(src)  # the fixture checks the input is unchanged
    run_cli("quantize", src, "-o", tmp_path / "single", *SHARDS, "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "single")


def test_part_killed_midway_resumes(tmp_path):
    src = sharded_model(tmp_path / "src", shards=4, rows=512, cols=512)
    killed = run_hooked("SIGKILL", "quantize", src, "-o", tmp_path / "out", "--partition", "1/2", "--workers", "1", "-q")
    assert killed.returncode == -signal.SIGKILL
    partial = parts_of(tmp_path / "out") / ".part-00001-of-00002.fp8conv-partial"
    assert partial.is_dir() and not (parts_of(tmp_path / "out") / "part-00001-of-00002").exists()
    run_cli("quantize", src, "-o", tmp_path / "out", "--partition", "2/2", "-q")
    refused = run_cli("merge", tmp_path / "out", expect=3)
    assert "part 1/2" in refused.stderr and "unfinished" in refused.stderr and "--resume" in refused.stderr
    resumed = run_cli("quantize", src, "-o", tmp_path / "out", "--partition", "1/2", "--resume", "-q")
    assert re.search(r"resumed: reused [1-9]\d* finished shard\(s\), sha256-checked", resumed.stderr)  # those journaled
    run_cli("merge", tmp_path / "out")
    run_cli("quantize", src, "-o", tmp_path / "single", "-q")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "single")


def test_partition_usage_errors(sample, tmp_path):
    src = sample("bert-tiny-fp32")
    for bad in ("0/2", "3/2", "a/b", "2"):
        result = run_cli("quantize", src, "-o", tmp_path / "out", "--partition", bad, expect=2)
        assert "--partition" in result.stderr
    result = run_cli("quantize", src, "-o", tmp_path / "out", "--parts", "2", expect=2)
    assert "--parts applies to --ray" in result.stderr
    result = run_cli("merge", tmp_path / "nothing", expect=3)
    assert "no parts to merge" in result.stderr


@pytest.mark.parametrize("damage", ["not json", '{"schema_version": 1}', "recipe"])
def test_damaged_part_record_refused_by_name(sample, tmp_path, damage):
    src = sample("llama-tiny")
    for part in ("1/2", "2/2"):
        run_cli("quantize", src, "-o", tmp_path / "out", *SHARDS, "--partition", part, "-q")
    record = parts_of(tmp_path / "out") / "part-00002-of-00002" / "fp8conv.part.json"
    if damage == "recipe":
        data = json.loads(record.read_text())
        data["recipe"]["scheme"]["format"] = "fp7"
        record.write_text(json.dumps(data))
    else:
        record.write_text(damage)
    result = run_cli("merge", tmp_path / "out", expect=3)
    assert "part-00002-of-00002" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
