"""Probe fitting: one batched torch L-BFGS for all sites vs a loop of sklearn fits, in one run.

Synthetic per-head activations [N, layers, 9 heads, d] (default 1000 x 30 x 9 x 64 = 270
sites); the label is planted at some sites with varying strength, the rest is noise.
Prints the seconds of each backend, the ratio and how far their validation accuracies differ.

    python bench/probe_speed.py [--n-sites 270] [--n 1000] [--d 64] [--threads T]
"""

from __future__ import annotations

import argparse
import time

import torch

from steerbench.probes import fit_probes

HEADS = 9


def synthetic(n: int, n_sites: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sites = (n_sites // HEADS, HEADS) if n_sites % HEADS == 0 else (n_sites,)
    y = torch.randint(0, 2, (n,), generator=g)
    acts = torch.randn(n, *sites, d, generator=g)
    strength = torch.rand(*sites, 1, generator=g) * (torch.rand(*sites, 1, generator=g) < 0.3)
    shift = strength * torch.randn(*sites, d, generator=g) / d**0.5
    acts += (2 * y - 1).view(n, *[1] * len(sites), 1) * shift
    return acts, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-sites", type=int, default=270)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch and BLAS threads (default: as installed)")
    args = ap.parse_args()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    acts, y = synthetic(args.n, args.n_sites, args.d)
    small = acts[:200].reshape(200, -1, args.d)[:, :3]
    for backend in ("torch", "sklearn"):  # warm-up: imports, thread pools
        fit_probes(small, y[:200], backend=backend)
    print(f"{args.n} examples, {args.n_sites} sites {tuple(acts.shape[1:-1])}, d={args.d}, "
          f"torch threads {torch.get_num_threads()}")
    secs, grids = {}, {}
    for backend in ("torch", "sklearn"):
        t = time.perf_counter()
        grids[backend] = fit_probes(acts, y, backend=backend)
        secs[backend] = time.perf_counter() - t
        print(f"{backend:8s} {secs[backend]:8.2f} s  mean val_acc {float(grids[backend].val_acc.mean()):.4f}")
    diff = (grids["torch"].val_acc - grids["sklearn"].val_acc).abs().max()
    print(f"sklearn / torch: {secs['sklearn'] / secs['torch']:.1f}x   max |val_acc difference| {float(diff):.4f}")


if __name__ == "__main__":
    main()
