"""Numbers a refactor must not move: CAA readouts on one behaviour, and a 50-question
TruthfulQA MC run of baseline, ITI and FASB (MC mode), plus a few steered generations.

    python bench/parity.py --write      # record bench/results/parity.json
    python bench/parity.py              # recompute and compare with it (max abs difference)

The same code path as the real benches (CAA.fit + ab_sweep, HeadProbes.fit + mc_scores +
FASB's MC mode, generate), on a slice small enough to run in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import steerbench as sb
from steerbench.evaluation import ab_sweep
from steerbench.truthfulqa import mc_mode_scores, mc_scores

OUT = Path(__file__).parent / "results" / "parity.json"
TOL = 1e-4


def measure() -> dict:
    model = sb.load_model()
    out: dict = {}
    t = time.time()
    train, test = sb.behavior("tone", "train"), sb.behavior("tone", "test")
    for read in ("letter", "answer"):
        caa = sb.CAA.fit(model, train, read=read)
        df = ab_sweep(model, lambda L, m: caa.at(L).scaled(m), test, [6, 12, 18, 24], [-4, 0, 4], progress=False)
        for row in df.itertuples():
            for col in ("letter", "win_rate", "margin"):
                out[f"caa:{read}:L{row.layer}:m{row.multiplier:g}:{col}"] = float(getattr(row, col))
    print(f"CAA readouts: {time.time() - t:.0f}s", flush=True)
    t = time.time()
    qs = sb.load_truthfulqa()
    test_q, fit_q = qs[:50], qs[50:150]
    probes = sb.HeadProbes.fit(model, fit_q)
    iti = probes.select(16, alpha=5.0)
    fasb = sb.FASB(probes.select(16), strength=10.0, threshold=0.6, backtrack=10)
    base, steered = mc_scores(model, test_q, [None, iti])
    mode = mc_mode_scores(model, test_q, fasb)
    for name, res in (("baseline", base), ("iti", steered), ("fasb-mc", mode.result)):
        for metric in ("mc1", "mc2", "mc3"):
            out[f"tqa:{name}:{metric}"] = float(getattr(res, metric))
    out["tqa:fasb-mc:rescored"] = float(mode.rescored)
    print(f"TruthfulQA MC: {time.time() - t:.0f}s", flush=True)
    for i, q in enumerate(test_q[:2]):
        for name, steer in (("iti", iti), ("fasb", fasb)):
            g = sb.generate(model, f"Q: {q.question}\nA:", steer=steer, max_new_tokens=20, chat=False, stop=("\n",))
            out[f"gen:{name}:{i}"] = g.text
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help=f"record the numbers in {OUT}")
    args = ap.parse_args()
    got = measure()
    if args.write:
        OUT.write_text(json.dumps(got, indent=1, sort_keys=True))
        print(f"wrote {len(got)} numbers to {OUT}")
        return
    want = json.loads(OUT.read_text())
    worst, bad = 0.0, []
    for key, v in want.items():
        if isinstance(v, str):
            if got.get(key) != v:
                bad.append(f"{key}: {v!r} -> {got.get(key)!r}")
            continue
        d = abs(got[key] - v)
        worst = max(worst, d)
        if d > TOL:
            bad.append(f"{key}: {v:.6f} -> {got[key]:.6f}")
    print(f"{len(want)} numbers compared; max abs difference {worst:.2e}")
    print("\n".join(bad) if bad else f"all within {TOL:g}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
