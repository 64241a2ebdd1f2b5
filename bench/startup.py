"""Start-up wall time of light commands, one or more fp8conv trees side by side.

    taskset -c 0,1 python3 bench/startup.py before=/path/old after=. --models sample_models/llama-tiny

Each command (`--version`, `--help`, `inspect MODEL`) runs --repeats times as a fresh process (bytecode
written first, as an installed package has it); median and minimum wall seconds. Never run in CI.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="NAME=PATH of an fp8conv checkout")
    parser.add_argument("--models", nargs="*", default=["sample_models/llama-tiny"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for item in args.trees:
        name, tree = item.split("=", 1)
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tree, "fp8conv")], check=True)
        for command in (["--version"], ["--help"], *(["inspect", m] for m in args.models)):
            walls = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "fp8conv", *command], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                walls.append(time.perf_counter() - start)
            print(f"{name:8s} {' '.join(command):45s} median {statistics.median(walls):.3f} s  min {min(walls):.3f} s",
                  flush=True)


if __name__ == "__main__":
    main()
