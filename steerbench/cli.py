"""Command line: ``steerbench demo`` and ``steerbench bench``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# -- argument types: a bad value stops argparse itself, before anything loads ------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = f"int >= {low}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _finite(text: str) -> float:
    v = _number(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def _fraction(text: str) -> float:
    v = _finite(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v:g}")
    return v


def _non_negative(text: str) -> float:  # may be inf (the KL budget: no budget)
    v = _number(text)
    if not v >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return v


def prepare_out(path: str) -> Path:
    """The output folder, created and proved writable before any work (a ParameterError
    naming the path otherwise), so a run never dies after its expensive part."""
    from steerbench.errors import ParameterError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} is a file, not a folder; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".steerbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ParameterError(f"--out {out} cannot be written ({err.strerror or err}); choose another folder") from None
    return out


def check_layers(model, layer: int | None, sweep: list[int] | None) -> None:
    """Layers given on the command line, checked against the model right after it loads,
    before any fitting (negative layers count from the end)."""
    from steerbench.errors import ParameterError

    for name, values in (("--layer", [] if layer is None else [layer]), ("--sweep-layers", sweep or [])):
        for v in values:
            try:
                model.check_layer(v)
            except ParameterError as err:
                raise ParameterError(f"{name}: {err}") from None


def demo(args: argparse.Namespace) -> int:
    import steerbench as sb
    from steerbench import plots
    from steerbench.evaluation import ab_sweep
    from steerbench.report import generations_html, write_page

    t0 = time.time()
    out = prepare_out(args.out)
    from steerbench.datasets import behaviors
    from steerbench.errors import ParameterError

    if args.behaviour not in behaviors():
        raise ParameterError(f"--behaviour {args.behaviour!r} is not an embedded set; choose from {behaviors()}")

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    model = sb.load_model(args.model)
    say(f"loaded {model}")
    check_layers(model, args.layer, args.sweep_layers)
    # layers as fractions of the depth, so the defaults travel between models (30 layers: 18; 6/12/18/24)
    layer = args.layer if args.layer is not None else model.layer_at(0.62)
    sweep_layers = args.sweep_layers or sorted({model.layer_at(f) for f in (0.2, 0.4, 0.62, 0.83)})
    train = sb.behavior(args.behaviour, "train")[: args.n_train]
    test = sb.behavior(args.behaviour, "test")[: args.n_test]
    questions = sb.behavior(args.behaviour, "open")[: args.n_prompts]
    caa = sb.CAA.fit(model, train, read=args.read, layer=layer, dataset=f"project:{args.behaviour}", unit=args.unit)
    if args.multipliers is None:
        args.multipliers = [-4.0, 0.0, 4.0] if args.unit == "multiplier" else [-0.5, 0.0, 0.5]
    path = caa.save(out / f"caa_{args.behaviour}_{args.read}.safetensors")
    say(f"fitted CAA ({args.read} read) on {len(train)} {args.behaviour} pairs -> {path}")

    rows = []
    for q in questions:
        print(f"\n  {q}")
        for m in args.multipliers:
            g = sb.generate(model, q, steer=caa.scaled(m), max_new_tokens=args.max_new_tokens)
            rows.append({"prompt": q, "multiplier": m, "unit": caa.strength_unit, "layer": caa.layer, "text": g.text})
            print(f"    m={m:+g}: {g.text!r}")
    (out / "generations.json").write_text(json.dumps(rows, indent=1))
    say(f"generated {len(rows)} answers at layer {caa.layer}")

    df = ab_sweep(model, lambda L, m: caa.at(L).scaled(m), test, sweep_layers, args.multipliers, progress=False)
    df.to_csv(out / "ab_sweep.csv", index=False)
    print()
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    say(f"scored {len(test)} held-out A/B items at {len(df)} settings")

    title = f"steerbench demo: CAA on '{args.behaviour}' ({model.name})"
    page = write_page(
        out / "report.html",
        title,
        [
            ("A/B score against multiplier (held-out items)", plots.ab_sweep(df, metrics=("win_rate", "letter", "margin"))),
            (f"Generations steered at layer {caa.layer} (greedy)", generations_html(rows)),
            ("CAA vector norm by layer", plots.vector_norms(caa.vectors)),
            ("Sweep table", df),
        ],
    )
    say(f"wrote {page}")
    return 0


def doctor(args: argparse.Namespace) -> int:
    from steerbench.doctor import report

    return 0 if report(smoke=not args.no_smoke) else 1


def log_row(path: Path, row: dict) -> None:
    """Append one finished (method, fold) row to a JSON-lines file as it completes."""
    with path.open("a") as fh:
        fh.write(json.dumps(row, default=float) + "\n")


def limit_heap_retention(threshold: int = 4 * 1024 * 1024) -> bool:
    """Serve allocations above ``threshold`` bytes by mmap, so freed activations go back to
    the system (glibc only; a no-op elsewhere). glibc raises its mmap threshold as large
    blocks are freed, and the heap then keeps what batches of varying length left behind:
    collecting the residual streams of 200 BoolQ answers (up to 600 tokens) peaked at
    7.1 GB and kept 3.6 GB afterwards; with a fixed threshold, 2.1 GB and 1.15 GB (the
    model). The same 2.14 GB peak at 128 KiB, 1 MiB and 4 MiB (149, 132, 140 s); but a
    CLAS training run on the tone set took 1.42x the wall time at 128 KiB than at 4 MiB
    (132 s against 93 s, twice the system time in page faults; peak 2.36 against 2.71 GB),
    so 4 MiB. The bench owns its process, so it sets this; a notebook can set
    ``MALLOC_MMAP_THRESHOLD_=4194304`` in the environment instead."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def bench(args: argparse.Namespace) -> int:
    import pandas as pd

    import steerbench as sb
    from steerbench import plots
    from steerbench.benchmark import AnswerActivations, parse_grid, run_bench
    from steerbench.datasets import load_mc, mc_set
    from steerbench.memory import peak_resident_bytes, ram_budget
    from steerbench.report import write_page

    t0 = time.time()
    limit_heap_retention()
    grids = parse_grid(args.set)  # fail on a typo or a bad value before loading anything
    spec = mc_set(args.data)
    prompt = args.prompt or spec.prompt
    every = load_mc(args.data)  # a missing or malformed file fails here, before the model loads
    out = prepare_out(args.out)
    (out / "rows.jsonl").unlink(missing_ok=True)
    model = sb.load_model(args.model)
    questions = load_mc(args.data, limit=args.limit, seed=args.seed) if args.limit is not None else every
    protocol = (f"{args.draws} draws of {args.few_label} fit + {args.few_label} validation items, the rest test"
                if args.few_label else f"{args.folds}-fold CV by item, {1 - args.val_fraction:.0%}/"
                                       f"{args.val_fraction:.0%} fit/val inside each fold")
    print(f"[{time.time() - t0:6.1f}s] {model}; {len(questions)} items from {args.data} (prompt {prompt!r}); {protocol}")
    heads = AnswerActivations(model, questions, spec.features, cache=not args.no_cache, progress=True)
    whole = AnswerActivations(model, every, spec.features, progress=True)
    if not args.no_cache and whole.path().exists():
        heads = whole  # a run on a subset reuses activations cached for the whole file
    with ram_budget(args.max_ram_gb):
        result = run_bench(
            model, questions, methods=args.methods, n_folds=args.folds, seed=args.seed, val_fraction=args.val_fraction,
            prompt=prompt, grids=grids, select=args.select, batch_size=args.batch_size,
            heads=heads, template=spec.features,
            generate=args.generate, max_new_tokens=args.max_new_tokens, max_kl=args.max_kl,
            on_row=lambda row: log_row(out / "rows.jsonl", row), few_label=args.few_label, draws=args.draws,
        )
    result.config["max_ram_gb"] = args.max_ram_gb
    result.config["peak_rss_gb"] = peak_resident_bytes() / 2**30  # the whole process, model load included
    table = result.summary()
    print()
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    result.config["data"] = args.data
    result.config["limit"] = args.limit
    metric = "MC1 / MC2 / MC3" if spec.name in ("truthfulqa", "misconceptions") else "accuracy (= MC1)"
    how = f"{args.draws} draws of {args.few_label}+{args.few_label} items" if args.few_label else f"{args.folds}-fold CV"
    result.config["title"] = (f"{args.data}: {metric}, {how} ({model.name}); prompt {prompt!r}; "
                              "hyperparameters chosen on validation items only")
    result.to_json(out / "results.json")
    long_fields = ("val", "answers", "strengths", "mc_strengths", "mc_first_flag")
    pd_folds = pd.DataFrame([{k: v for k, v in r.items() if k not in long_fields}
                             for r in result.folds])
    pd_folds.to_csv(out / "folds.csv", index=False)
    fig = result.figure()
    plots.save_html(fig, out / "bench_bars.html")
    page = write_page(out / "report.html", result.config["title"],
                      [("Test scores by method (each question scored once, in its test fold)", fig),
                       ("Summary", table), ("Per fold", pd_folds)])
    print(f"[{time.time() - t0:6.1f}s] wrote {out / 'results.json'} and {page}; peak resident memory "
          f"{result.config['peak_rss_gb']:.2f} GB")
    return 0


def main(argv: list[str] | None = None) -> int:
    from steerbench.benchmark import METHODS
    from steerbench.truthfulqa import PROMPTS

    parser = argparse.ArgumentParser(prog="steerbench", description="activation steering workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="CAA on the default model: steered generations and A/B scores, as an HTML report")
    d.add_argument("--out", default="steerbench-demo", help="folder for report.html and data (default: %(default)s)")
    d.add_argument("--behaviour", default="tone", help="embedded behaviour set: tone or refusal (default: %(default)s)")
    d.add_argument("--read", default="answer", choices=["answer", "letter"],
                   help="where CAA reads activations: mean over answer tokens, or the answer letter (reference)")
    d.add_argument("--model", default=None, help="a model name: gemma-3-270m (offline), a hub name, or the "
                                                 "default SmolLM2-135M-Instruct (offline)")
    d.add_argument("--layer", type=int, default=None,
                   help="layer steered in the generations (default: 62%% of the depth, 18 of 30)")
    d.add_argument("--sweep-layers", type=int, nargs="+", default=None,
                   help="layers of the A/B sweep (default: 20/40/62/83%% of the depth: 6/12/18/24 of 30)")
    d.add_argument("--unit", default="multiplier", choices=["multiplier", "resid"],
                   help="what a multiplier counts: m x the CAA vector (reference), or s x the mean residual norm "
                        "at the layer, which travels between layers and models (default: %(default)s)")
    d.add_argument("--multipliers", type=_finite, nargs="+", default=None,
                   help="strengths (default: -4 0 4, or -0.5 0 0.5 with --unit resid)")
    d.add_argument("--n-train", type=_int_at_least(1), default=None, help="training pairs used (default: all)")
    d.add_argument("--n-test", type=_int_at_least(1), default=25, help="held-out A/B items scored per setting")
    d.add_argument("--n-prompts", type=_int_at_least(1), default=3, help="open-ended prompts to generate from")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=40)
    b = sub.add_parser("bench", help="compare steering methods on multiple-choice data (TruthfulQA, COPA, WinoGrande, "
                                     "BoolQ, MMLU) with cross-validation by item")
    b.add_argument("--methods", nargs="+", default=["baseline", "iti", "fasb"], choices=sorted(METHODS),
                   help="methods to compare (default: %(default)s)")
    b.add_argument("--data", default="truthfulqa",
                   help="truthfulqa, copa, winogrande, boolq, mmlu (../shared/data), misconceptions, tone, refusal (embedded), a "
                        "TruthfulQA-format CSV or multiple-choice JSON(L) records (default: %(default)s)")
    b.add_argument("--model", default=None, help="a model name (default: SmolLM2-135M-Instruct, offline)")
    b.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="use N items: the first N questions of a TruthfulQA-format CSV, a random subset (seeded by "
                        "--seed) of the other sets (default: all)")
    b.add_argument("--folds", type=_int_at_least(2), default=2)
    b.add_argument("--few-label", type=_int_at_least(0), default=0, metavar="N",
                   help="instead of cross-validation: train on N items, validate on N, test on the rest "
                        "(CLAS's protocol: 10), over --draws seeded draws")
    b.add_argument("--draws", type=_int_at_least(1), default=3,
                   help="seeded draws of the --few-label items (default: %(default)s)")
    b.add_argument("--val-fraction", type=_fraction, default=0.2, help="validation share of each fold's training questions")
    b.add_argument("--seed", type=_int_at_least(0), default=42)
    b.add_argument("--prompt", default=None, choices=sorted(PROMPTS),
                   help="scoring prompt template (default: the set's own: instruction+primer for TruthfulQA, "
                        "zero-shot templates for the others; docs/benchmarks.md)")
    b.add_argument("--select", default="mc2", choices=["mc1", "mc2", "mc3"], help="validation metric that picks hyperparameters")
    b.add_argument("--set", action="append", default=[], metavar="METHOD.PARAM=V1,V2",
                   help="override a method's hyperparameter grid, e.g. --set iti.alpha=5,15 (repeatable)")
    b.add_argument("--generate", type=_int_at_least(0), default=0, metavar="N",
                   help="also generate answers to the first N test questions of each fold and score them "
                        "with TruthfulQA's automatic truth metric (ROUGE-L and embeddings)")
    b.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    b.add_argument("--max-kl", type=_non_negative, default=0.5,
                   help="choose only settings whose KL to the unsteered model on neutral text (nats/token) is at "
                        "most this (default: %(default)s; 'inf' chooses on the validation score alone)")
    b.add_argument("--batch-size", type=_int_at_least(1), default=16)
    b.add_argument("--no-cache", action="store_true", help="do not read or write cached head activations")
    b.add_argument("--max-ram-gb", type=_non_negative, default=None, metavar="GB",
                   help="resident-memory budget: activation sets past it live in files the OS pages to disk, "
                        "cached ones are memory-mapped (same results; default: no budget, all in RAM)")
    b.add_argument("--out", default="steerbench-bench", help="folder for results.json, folds.csv and report.html")
    doc = sub.add_parser("doctor", help="versions, device, cache folder, the default model's fingerprint and a "
                                        "smoke check (run it when something looks wrong)")
    doc.add_argument("--no-smoke", action="store_true", help="skip the smoke check (generation and the KV-cache test)")
    args = parser.parse_args(argv)
    from steerbench.errors import SteerbenchError

    try:
        if args.command == "doctor":
            return doctor(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "bench":
            return bench(args)
    except SteerbenchError as err:  # a bad value, dataset or artifact: say what, as argparse does, no traceback
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
