"""NVFP4 global scales computed by forked workers over row ranges (run/global_scales.py): the same scales as
the float64 reference of test_microscale from the amax the test takes itself, for any split and number of
workers; NaN anywhere in a weight is refused with the whole weight's count."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from fp8conv.errors import InputError
from fp8conv.plan.scheme import microscale_scheme
from fp8conv.run.global_scales import global_scales
from fp8conv.run.options import QuantizeOptions, RunOptions
from fp8conv.run.planning import make_plan
from test_microscale import ref_global_scale
from test_microscale_cli import BF16, save, sharded_llama

pytestmark = pytest.mark.unit

FUSED = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
         "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
         "up_proj": ("gate_proj", "up_proj"), "o_proj": ("o_proj",)}


def nvfp4_plan(src, observer: str = "minmax"):
    return make_plan(src, QuantizeOptions(scheme=replace(microscale_scheme("nvfp4"), observer=observer)))


@pytest.mark.parametrize("observer, headroom", [("minmax", 1.0), ("expanded", 1.25)])
@pytest.mark.parametrize("workers, job_bytes, backend", [(1, 64 << 20, "native"), (2, 64 << 20, "numpy"),
                                                         (2, 1000, "native"), (3, 128, "numpy")])
def test_scales_match_the_reference_for_any_split(tmp_path, workers, job_bytes, backend, observer, headroom):
    """min-max: 448 * 6 / amax; expanded: the same rule on 1.25x the amax (#28), over each fused set."""
    src, tensors = sharded_llama(tmp_path / "src", [["q_proj", "gate_proj"], ["k_proj", "v_proj", "up_proj", "o_proj"]])
    checkpoint, plan = nvfp4_plan(src, observer)
    scales = global_scales(checkpoint, plan, RunOptions(workers=workers, job_bytes=job_bytes, backend=backend))
    amax = {name.split(".")[-2]: float(np.abs(w.astype(np.float64)).max()) for name, w in tensors.items()}
    assert set(scales) == set(tensors)
    for name in tensors:
        member = name.split(".")[-2]
        expected = ref_global_scale(float(np.float32(max(amax[m] for m in FUSED[member]) * headroom)), BF16)
        assert scales[name] == [np.float32(expected)], f"{name}: {scales[name]} != {expected}"


@pytest.mark.parametrize("workers", [1, 2])
def test_nan_in_any_row_range_is_refused_with_the_whole_count(tmp_path, workers):
    src = tmp_path / "src"
    src.mkdir()
    w = np.ones((64, 32), np.float32)
    w[3, 1] = w[60, 30] = np.nan  # in the first and the last row range of 1 KiB
    save(src / "model.safetensors", {"x.weight": w.astype(BF16), "y.weight": np.ones((16, 32), BF16)})
    checkpoint, plan = nvfp4_plan(src)
    with pytest.raises(InputError, match=r"x\.weight.*2 NaN"):
        global_scales(checkpoint, plan, RunOptions(workers=workers, job_bytes=1024))


def test_workers_inherit_ml_dtypes_from_the_parent(tmp_path):
    """A bf16 source loads ml_dtypes (1-2 s with 0.7.0) once, in the parent before the fork, not in each worker:
    a fresh interpreter whose workers note whether it was loaded when their first item started."""
    src, _ = sharded_llama(tmp_path / "src", [["q_proj", "gate_proj"], ["k_proj", "v_proj"]])
    notes = tmp_path / "notes.txt"
    code = f"""
import sys
from fp8conv.plan.scheme import microscale_scheme
from fp8conv.run import global_scales as gs
from fp8conv.run.options import QuantizeOptions, RunOptions
from fp8conv.run.planning import make_plan
assert "ml_dtypes" not in sys.modules
checkpoint, plan = make_plan({str(src)!r}, QuantizeOptions(scheme=microscale_scheme("nvfp4")))
original = gs._amax
def noted(*args):
    with open({str(notes)!r}, "a") as fh:
        fh.write(str("ml_dtypes" in sys.modules) + "\\n")
    return original(*args)
gs._amax = noted
gs.global_scales(checkpoint, plan, RunOptions(workers=2, job_bytes=2048))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seen = notes.read_text().split()
    assert len(seen) > 2 and set(seen) == {"True"}, seen
