"""Our FP8 codes and scales through a real block-scaled FP8 tensor-core GEMM (torch._scaled_mm).

Runs the computation vLLM / DeepSeek run for W8A8 block FP8: activations quantized per token in
1x128 groups (dynamic), weights = fp8conv's e4m3 codes with their 128x128 float32 scale grid.
Every quantized nn.Linear of a Llama is replaced by that GEMM; logits are compared with the bf16
model and with the model run on our dequantized weights.

    python bench/gpu_check.py                  # on a CUDA GPU with compute capability >= 8.9
    python bench/gpu_check.py --emulate        # anywhere: same code path, GEMM emulated in float32

It checks the Llama sample (sample_models/llama-tiny, K=704 padded to 768 as vLLM does) and a
synthetic Llama of a few hundred MB generated and converted on the machine itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fp8conv.io.checkpoint import open_checkpoint  # noqa: E402
from fp8conv.layouts.read import Readers, open_view  # noqa: E402

BLOCK = 128
FP8 = torch.float8_e4m3fn
IDS = [[1, 15, 29, 88, 101, 233, 377, 42, 7, 250, 13, 99, 401, 2, 64, 128]]


def fp8conv(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fp8conv", *args, "-q"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, 1x128 groups: float32 scale = amax / 448, codes e4m3 (dynamic, as vLLM)."""
    m, k = x.shape
    groups = x.float().view(m, k // BLOCK, BLOCK)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / 448.0
    codes = (groups / scale[..., None]).clamp(-448, 448).to(FP8).view(m, k)
    return codes, scale


class BlockFP8Linear(torch.nn.Module):
    """y = x W^T with x quantized per 1x128 group and W = fp8conv codes x 128x128 scale grid."""

    def __init__(self, codes: torch.Tensor, grid: torch.Tensor, bias: torch.Tensor | None, emulate: bool) -> None:
        super().__init__()
        n, k = codes.shape
        self.n, self.k = n, k
        # Pad N and K to multiples of 4 blocks: torch 2.11's block-scaled _scaled_mm on H100 returns
        # wrong results (rel. error 0.29, no error raised) when K/128 is not a multiple of 4 (seen
        # with K=2816). Zero codes contribute nothing; padded scales are 1.0.
        pad_k, pad_n = -k % (4 * BLOCK), -n % (4 * BLOCK)
        self.codes = torch.nn.functional.pad(codes.view(torch.uint8), (0, pad_k, 0, pad_n)).view(FP8)
        grid = grid.float()
        rows, cols = self.codes.shape[0] // BLOCK, self.codes.shape[1] // BLOCK
        self.grid = torch.nn.functional.pad(grid, (0, cols - grid.shape[1], 0, rows - grid.shape[0]), value=1.0).contiguous()
        self.bias = bias
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        pad_k = self.codes.shape[1] - self.k
        if pad_k:
            x2 = torch.nn.functional.pad(x2, (0, pad_k))
        m = x2.shape[0]
        pad_m = -m % 16  # the FP8 GEMM wants M a multiple of 16
        if pad_m:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad_m))
        xq, xs = quantize_activations(x2)
        if self.emulate:
            a = xq.float() * xs.repeat_interleave(BLOCK, 1)
            w = self.codes.float() * self.grid.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
            y = (a @ w.t()).to(torch.bfloat16)
        else:
            scale_a = torch.empty(xs.shape[1], xs.shape[0], device=x.device, dtype=torch.float32).t()
            scale_a.copy_(xs)  # (M, K/128), outer-dim-major
            y = torch._scaled_mm(xq, self.codes.t(), scale_a=scale_a, scale_b=self.grid.t(), out_dtype=torch.bfloat16)
        y = y[:m, : self.n]  # drop padded tokens and output features
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.n)


def swap_linears(model: torch.nn.Module, folder: Path, device: str, emulate: bool) -> int:
    """Replace every Linear that fp8conv quantized with BlockFP8Linear built from the files."""
    checkpoint = open_checkpoint(folder)
    view = open_view(checkpoint)
    swapped = 0
    with Readers(checkpoint) as readers:
        for name, qw in view.weights.items():
            assert qw.scheme is not None and qw.scale is not None and qw.scheme.block_size == (BLOCK, BLOCK)
            module_name = name[: -len(".weight")]
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            codes = torch.from_numpy(readers.read(qw.weight).view(np.uint8).copy()).view(FP8).to(device)
            grid = torch.from_numpy(readers.read(qw.scale).astype(np.float32)).to(device)
            setattr(parent, child, BlockFP8Linear(codes, grid, old.bias, emulate))
            swapped += 1
    return swapped


def logits(model: torch.nn.Module, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS, device=device)).logits.float().cpu()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def check(label: str, source: Path, work: Path, device: str, emulate: bool) -> dict:
    from transformers import AutoModelForCausalLM

    fp8, deq = work / f"{label}-fp8", work / f"{label}-deq"
    start = time.perf_counter()
    fp8conv("quantize", str(source), "-o", str(fp8), "--layout", "fp8-native", "--overwrite")
    convert_s = time.perf_counter() - start
    fp8conv("dequantize", str(fp8), "-o", str(deq), "--overwrite")
    load = dict(dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(source, **load).to(device).eval()
    ref_logits = logits(reference, device)
    dequantized = AutoModelForCausalLM.from_pretrained(deq, **load).to(device).eval()
    deq_logits = logits(dequantized, device)
    swapped = swap_linears(dequantized, fp8, device, emulate)
    fp8_logits = logits(dequantized, device)
    return {
        "model": label,
        "source_bytes": sum(p.stat().st_size for p in source.glob("*.safetensors")),
        "quantize_seconds": round(convert_s, 2),
        "fp8_linears": swapped,
        "fp8_gemm_vs_bf16_model": compare(fp8_logits, ref_logits),
        "fp8_gemm_vs_dequantized_weights": compare(fp8_logits, deq_logits),
        "dequantized_weights_vs_bf16_model": compare(deq_logits, ref_logits),
    }


def gemm_accuracy(device: str, emulate: bool) -> dict:
    """One layer: FP8 GEMM vs float64 product of the same dequantized operands."""
    from fp8conv import quantize_tensor

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1024, 2816)) * 0.02).astype(np.float32)
    q = quantize_tensor(w, format="fp8_e4m3", granularity="block", block_size=BLOCK)
    codes = torch.from_numpy(q.codes.view(np.uint8).copy()).view(FP8).to(device)
    layer = BlockFP8Linear(codes, torch.from_numpy(q.scales).to(device), None, emulate)
    x = torch.from_numpy(rng.standard_normal((64, 2816)).astype(np.float32)).to(device).to(torch.bfloat16)
    y = layer(x).double().cpu()
    xq, xs = quantize_activations(x)
    a = (xq.double() * xs.double().repeat_interleave(BLOCK, 1)).cpu()
    wd = torch.from_numpy(q.codes.astype(np.float64) * np.repeat(np.repeat(q.scales, BLOCK, 0), BLOCK, 1)[:1024, :2816])
    ref = a @ wd.t()
    return {"rel_error_vs_float64": ((y - ref).norm() / ref.norm()).item()}


def synthetic_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=256)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", action="store_true", help="emulate the FP8 GEMM in float32 (no GPU needed)")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.emulate else "cuda"
    info = {"torch": torch.__version__, "emulated": args.emulate}
    if not args.emulate:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    results = {"info": info, "gemm": gemm_accuracy(device, args.emulate), "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["models"].append(check("llama-tiny", ROOT / "sample_models" / "llama-tiny", work, device, args.emulate))
        if not args.skip_synthetic:
            results["models"].append(check("synthetic-llama", synthetic_llama(work / "synthetic"), work, device, args.emulate))
    text = json.dumps(results, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
