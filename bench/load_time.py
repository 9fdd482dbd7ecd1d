"""Load time of the default model: cold (dequantize the GGUF) and cached (safetensors).

Each load runs in a fresh Python process; the cold one uses an empty cache folder.

    python bench/load_time.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

SNIPPET = "import time; t=time.perf_counter(); import steerbench as sb; m=sb.load_model(); print(time.perf_counter()-t)"


def load_seconds(cache: str) -> tuple[float, float]:
    env = dict(os.environ, STEERBENCH_CACHE=cache)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        cold = load_seconds(cache)
        warm = [load_seconds(cache) for _ in range(2)]
    print(f"{'':8s} {'load_model()':>13s} {'whole process':>14s}")
    print(f"{'cold':8s} {cold[0]:12.1f}s {cold[1]:13.1f}s   (dequantize GGUF, write safetensors cache)")
    for w in warm:
        print(f"{'cached':8s} {w[0]:12.1f}s {w[1]:13.1f}s")
    print(f"cached / cold (load_model): {min(w[0] for w in warm) / cold[0]:.2f}")


if __name__ == "__main__":
    main()
