"""The plain torch script users write today: per shard, load it whole, 128x128 block amax / 448,
cast with .to(torch.float8_e4m3fn), save. Same tensor selection as fp8conv's defaults.

    python bench/torch_baseline.py SRC OUT
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SKIP = ("embed_tokens", "lm_head", "mlp.gate.")
BLOCK = 128


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    pr, pc = -rows % BLOCK, -cols % BLOCK
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    tiles = padded.view((rows + pr) // BLOCK, BLOCK, (cols + pc) // BLOCK, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(rows + pr, cols + pc)[:rows, :cols].contiguous(), scale


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(shard))
        result = {}
        for name, t in tensors.items():
            if name.endswith(".weight") and t.dim() == 2 and not any(s in name for s in SKIP):
                result[name], result[name[:-6] + "weight_scale"] = quantize_block(t)
            else:
                result[name] = t
        save_file(result, str(out / shard.name), metadata={"format": "pt"})
        weight_map.update({n: shard.name for n in result})
        del tensors, result
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", out / "config.json")


if __name__ == "__main__":
    main()
