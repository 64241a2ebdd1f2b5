"""The HTML report: written by every conversion, re-rendered by `fp8conv report`, and by `verify --html`.

The numbers on the page are read back from the page's text and compared with report.json (or the
verify result); the expected heatmap cells are derived here from the tensor names with a regex of
the test's own. A slow test renders the page in headless Chromium."""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct

import numpy as np
import pytest

import browser
import stfile
from helpers import read_json, run_cli
from htmldom import equals, parse
from test_architecture import tied_llama  # noqa: F401  (fixture)

from fp8conv.report import html_page as html_report
from fp8conv.io.safetensors import printable

LLAMA_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "section", "div", "b",
                "span", "i", "code", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "footer", "svg", "g", "rect",
                "text", "line", "defs", "lineargradient", "stop"}


def convert(src, out, *args):
    run_cli("quantize", src, "-o", out, "--workers", "1", *args)
    return read_json(out / "fp8conv.report.json"), (out / "fp8conv.report.html").read_text(encoding="utf-8")


def check_numbers(dom, report: dict) -> None:
    """Every number of the sizes table, the summary cards, the worst-tensor and hot-spot tables equals report.json's."""
    for dtype in sorted(set(report["bytes_before"]) | set(report["bytes_after"])):
        cells = dom.find("tr", data_dtype=dtype).find_all("td")
        assert int(cells[1].text().split()[0].replace(",", "")) == report["bytes_before"].get(dtype, 0), dtype
        assert int(cells[2].text().split()[0].replace(",", "")) == report["bytes_after"].get(dtype, 0), dtype
    total = dom.find("tr", data_dtype="total").find_all("td")
    assert int(total[2].text().split()[0].replace(",", "")) == report["total_bytes_after"]
    for key in ("compression_ratio", "bits_per_weight", "bits_per_parameter"):
        assert equals(dom.find("div", cls="card", data_key=key).find("b").text(), report[key]), key
    expected_bpw = 8 * report["bytes_quantized_with_scales"] / report["parameters_quantized"]
    assert math.isclose(report["bits_per_weight"], expected_bpw)
    worst = sorted(report["tensors"], key=lambda r: (-r["rel_rms_error"], r["name"]))[:20]
    table = dom.find("table", data_table="worst")
    columns = table.attrs["data-columns"].split(",")
    rows = table.find("tbody").find_all("tr")
    assert [r.attrs["data-name"] for r in rows] == [printable(r["name"]) for r in worst]
    for tr, expected in zip(rows, worst):
        cells = tr.find_all("td")[1:]
        for key, td in zip(columns, cells):
            value = expected[key]
            if key == "shape":
                assert td.text() == "x".join(map(str, value))
            elif value is None:
                assert td.text() in ("exact", "–")
            elif isinstance(value, (int, float)):
                assert equals(td.text(), value), (expected["name"], key, td.text(), value)
    for key in ("saturated_fraction", "flushed_fraction"):
        hot = sorted((r for r in report["tensors"] if r[key] > 0), key=lambda r: (-r[key], r["name"]))[:10]
        shown = dom.find("table", cls="hotspots", data_key=key).find("tbody").find_all("tr")
        assert [tr.attrs["data-name"] for tr in shown] == [printable(r["name"]) for r in hot]
        for tr, r in zip(shown, hot):
            assert equals(tr.find_all("td")[1].text(), r[key])


def check_heatmap(dom, report: dict) -> None:
    """One cell per (layer, module) of the Llama names; each shows the worst relative error, in percent."""
    expected: dict[tuple[str, str], float] = {}
    for row in report["tensors"]:
        layer, module = LLAMA_NAME.fullmatch(row["name"]).groups()
        expected[(layer, module)] = max(expected.get((layer, module), 0.0), row["rel_rms_error"])
    cells = dom.find_all("g", cls="cell")
    assert len(cells) == len(expected)
    assert {(c.attrs["data-layer"], c.attrs["data-module"]) for c in cells} == set(expected)
    for cell in cells:
        value = expected[(cell.attrs["data-layer"], cell.attrs["data-module"])]
        assert equals(cell.find("text").text() + "%", value)


def test_conversion_writes_the_page_listed_in_the_manifest(sample, tmp_path):
    out = tmp_path / "out"
    report, page = convert(sample("llama-tiny"), out)
    manifest = read_json(out / "fp8conv.manifest.json")
    record = manifest["files"]["fp8conv.report.html"]
    data = (out / "fp8conv.report.html").read_bytes()
    assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    # vLLM refuses the sample's 704-row gate_proj fused with up_proj in block 128: check transformers' load
    assert run_cli("verify", out, "--json", "--engine", "transformers").exit_code == 0
    dom, tags = parse(page)
    assert set(tags) <= ALLOWED_TAGS, set(tags) - ALLOWED_TAGS
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "@media (prefers-color-scheme:dark)" in page and "@media print" in page
    check_numbers(dom, report)
    check_heatmap(dom, report)
    kept = dom.find("section", id="high-precision").find("tbody").find_all("tr")
    reasons = {}
    for row in report["high_precision"]:
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    assert {tr.find_all("td")[0].text(): int(tr.find_all("td")[1].text()) for tr in kept} == reasons
    assert reasons == {"1-D tensor (norm or bias)": 5,
                       "embedding kept in high precision by default: a lookup table (nn.Embedding), not a Linear; "
                       "engines load it unquantized (--include to quantize)": 1,
                       "lm_head kept in high precision by default: engines keep the output head unquantized "
                       "(the most error-sensitive matrix) (--include to quantize)": 1}


def test_report_command_rerenders_the_same_bytes(sample, tmp_path):
    out = tmp_path / "out"
    _, page = convert(sample("llama-tiny"), out)
    run_cli("report", out, "--html", tmp_path / "again.html")
    assert (tmp_path / "again.html").read_text(encoding="utf-8") == page
    assert run_cli("report", out, "--html", "-").stdout == page
    (out / "fp8conv.report.html").unlink()
    run_cli("report", out)
    assert (out / "fp8conv.report.html").read_text(encoding="utf-8") == page
    assert run_cli("verify", out, "--engine", "transformers").exit_code == 0  # the manifest's sha256 holds again


def test_report_command_refusals(tmp_path):
    assert "has no fp8conv.report.json" in run_cli("report", tmp_path, expect=3).stderr
    (tmp_path / "fp8conv.report.json").write_text("{not json")
    assert "is not readable JSON" in run_cli("report", tmp_path, expect=3).stderr
    (tmp_path / "fp8conv.report.json").write_text(json.dumps({"tensors": [{"name": "w", "rel_rms_error": "high"}]}))
    assert "non-numeric rel_rms_error" in run_cli("report", tmp_path, expect=3).stderr
    (tmp_path / "fp8conv.report.json").write_text(json.dumps({"tensors": []}))
    result = run_cli("report", tmp_path, "--html", tmp_path / "missing" / "page.html", expect=4)
    assert result.stderr.count("\n") == 1 and "cannot write" in result.stderr


def test_quantized_input_shows_carried_and_requantized(sample, tmp_path):
    src = sample("llama-tiny")
    convert(src, tmp_path / "fp8")
    carried, page = convert(tmp_path / "fp8", tmp_path / "carried")
    dom, _ = parse(page)
    section = dom.find("section", id="paths")
    assert dom.find("tr", data_path="carry").find_all("td")[1].text() == str(carried["tensors_by_path"]["carry"]) == "14"
    names = [tr.attrs["data-name"] for tr in section.find("table", data_table="carry").find("tbody").find_all("tr")]
    assert names == sorted(r["name"] for r in carried["tensors"] if r["path"] == "carry")
    requantized, page = convert(tmp_path / "fp8", tmp_path / "int8", "--format", "int8", "--granularity", "channel")
    dom, _ = parse(page)
    table = dom.find("table", data_table="requantize")
    assert len(table.find("tbody").find_all("tr")) == requantized["tensors_by_path"]["requantize"] == 14
    check_numbers(dom, requantized)


def test_dequantized_output_has_a_page(sample, tmp_path):
    convert(sample("llama-tiny"), tmp_path / "fp8")
    run_cli("dequantize", tmp_path / "fp8", "-o", tmp_path / "bf16", "--workers", "1")
    report = read_json(tmp_path / "bf16" / "fp8conv.report.json")
    dom, _ = parse((tmp_path / "bf16" / "fp8conv.report.html").read_text(encoding="utf-8"))
    assert dom.find("tr", data_dtype="BF16").find_all("td")[2].text().startswith(f"{report['bytes_after']['BF16']:,}")
    assert not dom.find_all("g", cls="cell")


def test_verify_page_shows_the_measured_errors(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    convert(src, out)
    measured = json.loads(run_cli("verify", out, "--against", src, "--json", "--html", tmp_path / "v.html",
                                  "--engine", "transformers").stdout)
    dom, tags = parse((tmp_path / "v.html").read_text(encoding="utf-8"))
    assert set(tags) <= ALLOWED_TAGS
    assert dom.find("h2").text() == "Verification: passed"
    assert {tr.attrs["data-check"]: tr.find_all("td")[1].text() for tr in dom.find("section", id="checks").find("tbody").find_all("tr")} \
        == measured["checks"]
    table = dom.find("table", data_table="worst")
    columns = table.attrs["data-columns"].split(",")
    assert "limit" in columns and "saturated_fraction" not in columns  # verify measures these, not saturation
    by_name = {t["name"]: t for t in measured["tensors"]}
    rows = table.find("tbody").find_all("tr")
    assert len(rows) == 14
    for tr in rows:
        for key, td in zip(columns, tr.find_all("td")[1:]):
            value = by_name[tr.attrs["data-name"]][key]
            if isinstance(value, float):
                assert equals(td.text(), value), key
    cells = dom.find_all("g", cls="cell")
    assert len(cells) == 14
    for cell in cells:
        assert float(cell.attrs["data-value"]) == by_name[cell.attrs["data-worst"]]["rel_rms_error"]


def test_verify_html_to_stdout_is_a_usage_error(sample, tmp_path):
    assert "give a file name" in run_cli("verify", tmp_path, "--html", "-", expect=2).stderr


def test_verify_html_of_a_failing_checkpoint_says_failed(sample, tmp_path):
    src, out = sample("llama-tiny"), tmp_path / "out"
    convert(src, out)
    run_cli("verify", out, "--against", src, "--max-rel-error", "0.001", "--html", tmp_path / "v.html",
            "--engine", "transformers", expect=1)
    dom, _ = parse((tmp_path / "v.html").read_text(encoding="utf-8"))
    assert dom.find("h2").text() == "Verification: FAILED"
    assert len(dom.find("section", id="checks").find_all("li", cls="fail")) == 14


HOSTILE = ["model.layers.0.<script>alert(1)</script>.weight", 'model.layers.0.a"b\'c&d<e>.weight',
           "model.layers.1.\x1b[31mred\x07\u2028.weight", "model.layers.1.x</svg><img src=x onerror=alert(1)>.weight"]


def _hostile_checkpoint(path):
    rng = np.random.default_rng(0)
    header, data, offset = {}, b"", 0
    for name in HOSTILE:
        block = rng.standard_normal((32, 64)).astype(np.float32).tobytes()
        header[name] = stfile.entry("F32", [32, 64], offset, offset + len(block))
        data, offset = data + block, offset + len(block)
    norm = struct.pack("<4f", 1, 1, 1, 1)
    header["model.layers.0.<b>norm</b>.weight"] = stfile.entry("F32", [4], offset, offset + len(norm))
    return stfile.write(path, header, data + norm)


def _check_inert(page: str, dom, tags) -> None:
    assert set(tags) <= ALLOWED_TAGS, set(tags) - ALLOWED_TAGS
    assert not any(k.startswith("on") for node in dom.iter() for k in node.attrs)
    assert not any(ord(c) < 32 and c != "\n" for c in page) and "\u2028" not in page
    assert "\x1b" not in dom.text()


def test_hostile_tensor_names_are_escaped(tmp_path):
    src = _hostile_checkpoint(tmp_path / "model.safetensors")
    report, page = convert(src, tmp_path / "out")
    dom, tags = parse(page)
    _check_inert(page, dom, tags)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    shown = [tr.attrs["data-name"] for tr in dom.find("table", data_table="worst").find("tbody").find_all("tr")]
    assert sorted(shown) == sorted(printable(n) for n in HOSTILE)
    assert printable(HOSTILE[2]) == "model.layers.1.\\x1b[31mred\\x07\\u2028.weight" and printable(HOSTILE[2]) in dom.text()
    assert {c.attrs["data-worst"] for c in dom.find_all("g", cls="cell")} == {printable(n) for n in HOSTILE}
    assert "model.layers.0.<b>norm</b>.weight" in dom.find("section", id="high-precision").text()


def test_hostile_strings_anywhere_in_a_report_are_escaped(tmp_path):
    evil = "<script>x()</script>\"'&\x00\x1b"
    report = {"scheme": {evil: evil, "format": evil}, "tensors_total": 1, "tensors_by_path": {evil: 1},
              "bytes_before": {evil: 10}, "bytes_after": {evil: 5}, "total_bytes_before": 10, "total_bytes_after": 5,
              "warnings": [evil], "high_precision": [{"name": evil, "reason": evil}],
              "tensors": [{"name": evil, "path": evil, "shape": [evil], "rel_rms_error": 0.1, "sqnr_db": 20.0,
                           "saturated_fraction": 0.5, evil: 1.5}]}
    (tmp_path / "fp8conv.report.json").write_text(json.dumps(report))
    page = run_cli("report", tmp_path, "--html", "-").stdout
    dom, tags = parse(page)
    _check_inert(page, dom, tags)
    assert "<script>" not in page and printable(evil) in dom.text()


def _synthetic_report(layers: int, experts: int) -> tuple[dict, dict]:
    """A 1,000-tensor MoE-shaped report (layers x (4 attention + experts x 3)), and the worst expert per cell."""
    rng = np.random.default_rng(1)
    tensors, worst = [], {}
    for layer in range(layers):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.append((f"model.layers.{layer}.self_attn.{module}.weight", str(layer), f"self_attn.{module}", None))
        for e in range(experts):
            for module in ("gate_proj", "up_proj", "down_proj"):
                tensors.append((f"model.layers.{layer}.mlp.experts.{e}.{module}.weight", str(layer), f"mlp.experts.*.{module}", str(e)))
    rows = []
    for name, layer, module, member in tensors:
        rel = float(rng.uniform(0.01, 0.05))
        rows.append({"name": name, "shape": [1024, 1024], "path": "quantize", "rel_rms_error": rel,
                     "sqnr_db": -20 * math.log10(rel), "max_abs_error": float(rng.uniform(0.01, 0.1)),
                     "saturated_fraction": float(rng.uniform(0, 1e-4)), "flushed_fraction": float(rng.uniform(0, 1e-3)),
                     "nonfinite_values": 0})
        if (layer, module) not in worst or rel > worst[(layer, module)][0]:
            worst[(layer, module)] = (rel, member)
    high = [{"name": f"model.layers.{i}.input_layernorm.weight", "dtype": "BF16", "shape": [1024], "reason": "1-D tensor (norm or bias)"}
            for i in range(layers)]
    report = {"scheme": {"format": "some_future_format", "granularity": "group", "group_size": 32, "layout": "x"},
              "tensors_total": len(rows) + len(high), "tensors_quantized": len(rows), "tensors_by_path": {"quantize": len(rows)},
              "bytes_before": {"BF16": 2 << 30}, "bytes_after": {"I8": 1 << 30, "F32": 1 << 20}, "total_bytes_before": 2 << 30,
              "total_bytes_after": (1 << 30) + (1 << 20), "compression_ratio": 1.99, "bits_per_weight": 4.25,
              "tensors": sorted(rows, key=lambda r: (-r["rel_rms_error"], r["name"])), "high_precision": high, "warnings": []}
    return report, worst


def test_a_1000_tensor_page_is_small_and_aggregates_experts():
    report, worst = _synthetic_report(layers=25, experts=12)
    assert len(report["tensors"]) == 1000
    page = html_report.render_conversion(report)
    assert len(page.encode()) < 1_000_000, len(page.encode())
    dom, _ = parse(page)
    cells = dom.find_all("g", cls="cell")
    assert len(cells) == 25 * 7 == len(worst)
    for cell in cells:
        key = (cell.attrs["data-layer"], cell.attrs["data-module"])
        rel, member = worst[key]
        assert float(cell.attrs["data-value"]) == rel
        if member is not None:
            assert cell.attrs["data-count"] == "12" and f".experts.{member}." in cell.attrs["data-worst"]
    assert "some_future_format" in dom.find("section", id="scheme").text()
    bars = dom.find("section", id="sqnr").find_all("rect", cls="bar")
    assert sum(int(b.attrs["data-count"]) for b in bars) == 1000
    assert html_report.render_conversion(report) == page  # a pure function of the report


@pytest.mark.slow
def test_page_in_headless_chromium(sample, tmp_path):
    if browser.chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package where apt-get can)")
    out = tmp_path / "out"
    report, _ = convert(sample("llama-tiny"), out)
    page = out / "fp8conv.report.html"
    colours, mean, variance = browser.pixel_stats(browser.screenshot(page, tmp_path / "page.png"))
    assert colours > 50 and variance > 100, (colours, variance)  # text, charts and the heatmap were drawn
    assert mean > 180, mean  # light background by default
    colours, dark_mean, variance = browser.pixel_stats(browser.screenshot(page, tmp_path / "dark.png", dark=True))
    assert dark_mean < 80 and colours > 50 and variance > 100, (dark_mean, colours, variance)
    pdf = browser.print_pdf(page, tmp_path / "page.pdf")
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 1
    dom, tags = parse(browser.dump_dom(page))
    assert "script" not in tags
    check_heatmap(dom, report)
    check_numbers(dom, report)
    hostile = _hostile_checkpoint(tmp_path / "hostile.safetensors")
    convert(hostile, tmp_path / "hostile")
    dom, tags = parse(browser.dump_dom(tmp_path / "hostile" / "fp8conv.report.html"))
    assert "script" not in tags and "img" not in tags
    assert "<script>alert(1)</script>" in dom.text()


def test_a_tied_head_is_listed_as_kept_in_high_precision(tied_llama, tmp_path):
    report, page = convert(tied_llama, tmp_path / "out")
    (row,) = [r for r in report["high_precision"] if r["name"] == "lm_head"]
    assert row["dtype"] is None and "tied to the input embedding" in row["reason"]
    dom, _ = parse(page)
    reasons = {tr.find_all("td")[0].text(): tr.find_all("td")[2].text()
               for tr in dom.find("section", id="high-precision").find("tbody").find_all("tr")}
    assert reasons[row["reason"]] == "lm_head"
