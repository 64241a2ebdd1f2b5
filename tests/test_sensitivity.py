"""fp8conv sensitivity: per-group KL ranking on a tiny random Llama, the budget arithmetic against a hand count of
the bytes compressed-tensors stores, the override list as quantize parses it, and bad input.

The reconstruction the probe runs is checked bit for bit against `fp8conv dequantize` of the written checkpoint,
so the probe measures the weights a quantized checkpoint holds.
"""
from __future__ import annotations

import json
import math
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from helpers import load_all, read_json, run_cli

torch = pytest.importorskip("torch", reason="needs the eval extra (torch CPU 2.13.0)")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from fp8conv.evaluate import probe as probing  # noqa: E402
from fp8conv.evaluate.sensitivity import (SENSITIVITY_NAME, Candidates, Group, check_overrides, choose,  # noqa: E402
                                          plan_candidates, summary_text)
from fp8conv.numerics.api import reconstruct_array  # noqa: E402
from fp8conv.plan.scheme import Scheme, parse_override, parse_spec  # noqa: E402
from fp8conv.run.global_scales import global_scales  # noqa: E402
from fp8conv.run.options import RunOptions  # noqa: E402

pytestmark = pytest.mark.interop
INT4 = Scheme(format="int4", granularity="group", group_size=64)
PROMOTE = "int8:channel:asym"


@pytest.fixture(scope="module")
def tiny(tiny_lm) -> Path:
    return tiny_lm


def sensitivity_json(src: Path, *options: str, expect: int = 0) -> dict:
    result = run_cli("sensitivity", src, "--json", "-q", "--tokens", "64", "--window", "32", *options, expect=expect)
    return json.loads(result.stdout)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp8conv: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ---- the probe's weights are the checkpoint's weights -----------------------------------------------


@pytest.mark.parametrize("options, scheme", [
    (["--format", "int4", "--group-size", "64"], INT4),
    (["--format", "int4", "--group-size", "64", "--asymmetric"], Scheme(format="int4", granularity="group", group_size=64,
                                                                         symmetric=False)),
    (["--format", "int8", "--granularity", "channel", "--asymmetric"], parse_spec(PROMOTE)),
    (["--format", "nvfp4"], parse_spec("nvfp4")),
    (["--format", "fp8_e4m3"], Scheme()),
], ids=["int4", "int4-asym", "int8-asym", "nvfp4", "fp8-block"])
def test_reconstruction_equals_dequantized_checkpoint_bit_for_bit(tiny, tmp_path, options, scheme):
    out, back = tmp_path / "q", tmp_path / "bf16"
    run_cli("quantize", tiny, "-o", out, "-q", *options)
    run_cli("dequantize", out, "-o", back, "-q", "--dtype", "bf16")
    checkpoint, plan, candidates = plan_candidates(tiny, scheme, None)
    scales = global_scales(checkpoint, plan, RunOptions())
    source, written = load_all(tiny), load_all(back)
    names = [n for g in candidates.groups for n in g.tensors]
    assert len(names) == 14
    for name in names:
        ours = reconstruct_array(source[name], candidates.schemes[name], scales.get(name), name, source[name].dtype)
        assert ours.dtype == written[name].dtype
        differ = np.flatnonzero(ours.view(np.uint16) != written[name].view(np.uint16))
        assert differ.size == 0, f"{name}: {differ.size} values differ, first at flat index {differ[:1]}"


# ---- ranking ------------------------------------------------------------------------------------------


def test_unchanged_group_gives_kl_exactly_zero_and_a_quantized_one_does_not(tiny):
    checkpoint, plan, candidates = plan_candidates(tiny, INT4, None)
    names = list(candidates.groups[0].tensors)
    windows = probing.token_windows(probing.load_tokenizer(tiny), probing.read_text(None), 64, 32)
    probe = probing.Probe(tiny, checkpoint, names, windows)
    with tempfile.TemporaryDirectory() as tmp:
        probe.reference(Path(tmp))
        same = {n: probe.params[n].detach().numpy().copy() for n in names}
        stats = probe.run_with(same)
        assert stats.kl_sum == 0.0 and stats.agree == stats.tokens == 62
        moved = {n: v + np.float32(0.05) for n, v in same.items()}
        assert probe.run_with(moved).kl_sum > 0
        assert probe.run_with(same).kl_sum == 0.0  # restored from the backup: the model is the source again


def test_ranking_is_deterministic_and_sorted(tiny):
    first = sensitivity_json(tiny, "--format", "int4", "--group-size", "64")
    second = sensitivity_json(tiny, "--format", "int4", "--group-size", "64")
    rows = [(g["group"], g["kl"], g["top1"]) for g in first["groups"]]
    assert rows == [(g["group"], g["kl"], g["top1"]) for g in second["groups"]]
    assert len(rows) == 8  # 2 layers x (q/k/v, o, gate/up, down)
    assert [g["rank"] for g in first["groups"]] == list(range(1, 9))
    kls = [g["kl"] for g in first["groups"]]
    assert all(k > 0 for k in kls) and kls == sorted(kls, reverse=True)
    assert {tuple(g["tensors"]) for g in first["groups"] if len(g["tensors"]) == 3} == {
        tuple(f"model.layers.{i}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")) for i in (0, 1)}
    assert first["suggestion"] is None and first["kl_all"] > 0


# ---- the budget ---------------------------------------------------------------------------------------


def stored_bytes(shape: tuple[int, int], spec: str) -> int:
    """Bytes compressed-tensors pack-quantized stores for one weight, counted by hand: int32 words of packed
    codes, bf16 scales, int64 weight_shape[2], int8 zero points packed 4 to an int32 along the output dim."""
    rows, cols = shape
    if spec == "int4 group 64":
        return rows * cols // 2 + 2 * rows * math.ceil(cols / 64) + 16
    if spec == PROMOTE:
        return rows * cols + 2 * rows + 4 * math.ceil(rows / 4) + 16
    raise AssertionError(spec)


def test_budget_arithmetic_equals_a_hand_count(tiny):
    _, plan, candidates = plan_candidates(tiny, INT4, PROMOTE)
    shapes = {n: tuple(plan.tensors[n].shape) for g in candidates.groups for n in g.tensors}
    elements = sum(r * c for r, c in shapes.values())
    for group in candidates.groups:
        assert group.base_bytes == sum(stored_bytes(shapes[n], "int4 group 64") for n in group.tensors)
        assert group.promoted_bytes == sum(stored_bytes(shapes[n], PROMOTE) for n in group.tensors)
    base = Fraction(8 * sum(stored_bytes(s, "int4 group 64") for s in shapes.values()), elements)
    assert candidates.bits(set()) == float(base)
    chosen = [candidates.groups[1], candidates.groups[6]]
    mixed = Fraction(8 * sum(stored_bytes(shapes[n], PROMOTE if any(n in g.tensors for g in chosen) else "int4 group 64")
                             for n in shapes), elements)
    assert candidates.bits({g.label for g in chosen}) == float(mixed)
    assert check_overrides(tiny, candidates, chosen) == float(mixed)  # quantize's own plan of the override list


def test_choose_fills_the_budget_by_kl_per_byte():
    groups = [Group(f"g{i}", (f"m{i}.weight",), 100, 50, 50 + extra, kl=kl)
              for i, (extra, kl) in enumerate([(100, 1.0), (10, 0.5), (50, 0.6), (10, 0.0), (30, None)])]
    candidates = Candidates(INT4, PROMOTE, groups, {})
    budget = 8 * (5 * 50 + 90) / 500  # 90 extra bytes allowed
    # by KL per extra byte: g4 (NaN/Inf: first), g1 (0.05), g2 (0.012), g0 (0.01); g3 moves no KL
    assert [g.label for g in choose(candidates, budget)] == ["g1", "g2", "g4"]
    assert [g.label for g in choose(candidates, 8 * 250 / 500)] == []


def test_suggestion_parses_in_quantize_and_meets_the_budget(tiny, tmp_path):
    data = sensitivity_json(tiny, "--format", "int4", "--group-size", "64", "--budget", "5")
    suggestion = data["suggestion"]
    assert suggestion["groups"] and suggestion["bits_per_weight"] <= 5
    assert suggestion["bits_per_weight_planned"] == suggestion["bits_per_weight"]
    for text in suggestion["overrides"]:
        pattern, scheme = parse_override(text)
        assert scheme == parse_spec(PROMOTE) and pattern.startswith("re:")
    out = tmp_path / "mixed"
    flags = [a for o in suggestion["overrides"] for a in ("--scheme", o)]
    report = json.loads(run_cli("quantize", tiny, "-o", out, "-q", "--json", "--format", "int4", "--group-size", "64",
                                *flags).stdout)
    assert report["bits_per_weight"] == suggestion["bits_per_weight"] <= 5
    promoted = {t for row in data["groups"] if row["group"] in suggestion["groups"] for t in row["tensors"]}
    config = read_json(out / "config.json")["quantization_config"]["config_groups"]
    targets = {t for g in config.values() if g["weights"]["num_bits"] == 8 for t in g["targets"]}
    assert {t[: -len(".weight")] for t in promoted} <= targets
    # On this random model the groups' KLs do not add up (all quantized is below the sum of the groups): the
    # suggestion's own measured KL says whether it helps, and a mix that does not is flagged, not sold.
    assert suggestion["lowers_kl"] == (suggestion["kl_mix"] < data["kl_all"])
    text = summary_text(data)
    assert ("warning: on this text the suggestion's probe KL is not below" in text) == (not suggestion["lowers_kl"])


def test_record_writes_the_file_lists_it_and_shows_it(tiny, tmp_path):
    out = tmp_path / "q"
    run_cli("quantize", tiny, "-o", out, "-q", "--format", "int4", "--group-size", "64")
    data = sensitivity_json(tiny, "--format", "int4", "--group-size", "64", "--record", out)
    assert read_json(out / SENSITIVITY_NAME) == data
    # the probe (fp8conv's reconstruction) and eval (the engine's loader) measure the same model: within 1e-6
    evaluation = json.loads(run_cli("eval", out, "--against", tiny, "--json", "-q", "--tokens", "64", "--window", "32").stdout)
    assert evaluation["overall"]["tokens"] == data["tokens"] == 62
    assert data["kl_all"] == pytest.approx(evaluation["overall"]["kl"], rel=1e-6)
    assert SENSITIVITY_NAME in read_json(out / "fp8conv.manifest.json")["files"]
    page = (out / "fp8conv.report.html").read_text()
    assert 'id="sensitivity"' in page and data["groups"][0]["group"] in page
    run_cli("verify", out, "-q")  # the manifest vouches for the new file
    run_cli("report", out)
    assert 'id="sensitivity"' in (out / "fp8conv.report.html").read_text()


# ---- bad input ----------------------------------------------------------------------------------------


def test_bad_input_gives_one_line_and_its_exit_code(tiny, tmp_path):
    base = ["sensitivity", tiny, "-q", "--tokens", "32"]
    assert "foo" in one_line_error(run_cli(*base, "--format", "foo", expect=None), 2)
    assert "unknown format" in one_line_error(run_cli(*base, "--format", "int4", "--group-size", "64", "--budget",
                                                      "5", "--promote", "int9:channel", expect=None), 2)
    line = one_line_error(run_cli(*base, "--format", "int4", "--group-size", "64", "--budget", "4", expect=None), 2)
    assert "below the 4.2" in line
    assert "NVFP4" in one_line_error(run_cli(*base, "--format", "nvfp4", "--budget", "5", expect=None), 2)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    one_line_error(run_cli("sensitivity", empty, "-q", expect=None), 3)
    line = one_line_error(run_cli(*base, "--format", "int4", "--group-size", "64", "--record", empty, expect=None), 3)
    assert "not an fp8conv output" in line
