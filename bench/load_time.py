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

# argv[2] "1": the first load as before the shared GGUF reader (transformers parses the file's
# metadata four times): the baseline of the cold row, measured in the same run
SNIPPET = ("import contextlib, resource, sys, time; t=time.perf_counter(); import steerbench as sb; "
           "import steerbench.model as M; "
           "M._one_gguf_parse = contextlib.nullcontext if sys.argv[2] == '1' else M._one_gguf_parse; "
           "m=sb.load_model(sys.argv[1] or None); "
           "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")


def load_seconds(cache: str, model: str, every_parse: bool = False) -> tuple[float, float, float]:
    env = dict(os.environ, STEERBENCH_CACHE=cache)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SNIPPET, model, "1" if every_parse else "0"], env=env,
                         capture_output=True, text=True, check=True)
    load, peak = out.stdout.strip().splitlines()[-1].split()
    return float(load), time.perf_counter() - t, float(peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help=MODEL_HELP)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        before = load_seconds(cache, args.model, every_parse=True)
    with tempfile.TemporaryDirectory() as cache:
        cold = load_seconds(cache, args.model)
        warm = [load_seconds(cache, args.model) for _ in range(2)]
    print(f"{args.model or 'default model'}")
    print(f"{'':8s} {'load_model()':>13s} {'whole process':>14s} {'peak RSS':>9s}")
    print(f"{'cold':8s} {cold[0]:12.1f}s {cold[1]:13.1f}s {cold[2]:7.2f} GB   (dequantize GGUF, write safetensors cache)")
    print(f"{'cold, 4x':8s} {before[0]:12.1f}s {before[1]:13.1f}s {before[2]:7.2f} GB   (the same, transformers "
          f"parsing the GGUF metadata four times: before the shared reader)")
    for w in warm:
        print(f"{'cached':8s} {w[0]:12.1f}s {w[1]:13.1f}s {w[2]:7.2f} GB")
    print(f"cached / cold (load_model): {min(w[0] for w in warm) / cold[0]:.2f}")
    print(f"cold / cold with four parses: {cold[0] / before[0]:.2f}")


if __name__ == "__main__":
    main()
