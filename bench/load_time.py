"""Load time and peak memory of an offline model: cold (dequantize the GGUF) and cached
(safetensors).

Each load runs in a fresh Python process; the cold one uses an empty cache folder. Peak
memory is the process's maximum resident set size (``ru_maxrss``).

    python bench/load_time.py [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from steerbench.model import MODEL_HELP

SNIPPET = ("import resource, sys, time; t=time.perf_counter(); import steerbench as sb; "
           "m=sb.load_model(sys.argv[1] or None); "
           "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")


def load_seconds(cache: str, model: str) -> tuple[float, float, float]:
    env = dict(os.environ, STEERBENCH_CACHE=cache)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SNIPPET, model], env=env, capture_output=True, text=True, check=True)
    load, peak = out.stdout.strip().splitlines()[-1].split()
    return float(load), time.perf_counter() - t, float(peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help=MODEL_HELP)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = load_seconds(cache, args.model)
        warm = [load_seconds(cache, args.model) for _ in range(2)]
    print(f"{args.model or 'default model'}")
    print(f"{'':8s} {'load_model()':>13s} {'whole process':>14s} {'peak RSS':>9s}")
    print(f"{'cold':8s} {cold[0]:12.1f}s {cold[1]:13.1f}s {cold[2]:7.2f} GB   (dequantize GGUF, write safetensors cache)")
    for w in warm:
        print(f"{'cached':8s} {w[0]:12.1f}s {w[1]:13.1f}s {w[2]:7.2f} GB")
    print(f"cached / cold (load_model): {min(w[0] for w in warm) / cold[0]:.2f}")


if __name__ == "__main__":
    main()
