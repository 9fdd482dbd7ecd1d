import json

import pytest

import steerbench as sb
from steerbench.benchmark import (
    METHODS,
    AnswerActivations,
    Method,
    inner_split,
    parse_grid,
    question_folds,
    register,
    run_bench,
)


def test_folds_partition_the_questions_and_inner_split_stays_inside_training():
    folds = question_folds(50, n_folds=2, seed=42)
    tests = [set(te) for _, te in folds]
    assert tests[0].isdisjoint(tests[1]) and tests[0] | tests[1] == set(range(50))
    for train, test in folds:
        assert set(train) == set(range(50)) - set(test)
        fit, val = inner_split(train, 0.2, seed=42)
        assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
        assert len(val) == 5  # 20% of 25 training questions
    assert question_folds(50, 2, seed=42) == folds and question_folds(50, 2, seed=7) != folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        question_folds(50, 1)
    with pytest.raises(ValueError, match="too few"):
        question_folds(3, 2)


@pytest.fixture
def spy():
    """A method that records every question it is shown."""
    seen = []

    @register
    class Spy(Method):
        name = "spy"
        grid = {"strength": [0.0, 1.0]}

        def candidates(self, data, grid):
            seen.append((list(data.fit), list(data.val)))
            data.heads.of(data.fit + data.val)  # what ITI reads
            return [({"strength": s}, None) for s in grid["strength"]]

    yield seen
    METHODS.pop("spy")


def test_no_test_question_reaches_fitting_or_selection(model, spy):
    questions = sb.load_truthfulqa("misconceptions")[:12]
    heads = AnswerActivations(model, questions, cache=False)
    read = []
    real_of = heads.of
    heads.of = lambda qs: (read.append(list(qs)), real_of(qs))[1]
    res = run_bench(model, questions, methods=["spy"], prompt="plain", kl_texts=["A short neutral text."],
                    heads=heads, log=lambda s: None)
    splits = res.config["splits"]
    assert len(spy) == 2 == len(splits)
    for (fit, val), split, acts_read in zip(spy, splits, read):
        test = {questions[i] for i in split["test"]}
        assert test.isdisjoint(fit) and test.isdisjoint(val) and test.isdisjoint(acts_read)
        assert set(fit) | set(val) == {questions[i] for i in split["train"]}
    # every question is scored exactly once, in its test fold
    assert sorted(res.per_question["spy"]) == list(range(12))


def test_no_test_item_reaches_caa_or_sadi_fitting_or_selection(model, monkeypatch):
    """Every activation a method reads (heads, MLP elements, residual streams) and every
    item it is scored on during selection is outside the fold's test items."""
    import steerbench.benchmark as bm

    questions = sb.load_mc("copa")[:12]
    events: list = []
    real_data, real_of = bm.FitData, AnswerActivations.of

    def fold_data(*a, **k):  # what a fold's methods may see is made once per fold, before they run
        events.append(("fold", None))
        return real_data(*a, **k)

    def of(self, qs):
        events.append((self.kind, list(qs)))
        return real_of(self, qs)

    monkeypatch.setattr(bm, "FitData", fold_data)
    monkeypatch.setattr(AnswerActivations, "of", of)
    scored = []
    for name in ("caa", "sadi", "sadi-neuron", "sadi-hidden"):
        real_score = type(METHODS[name]).score

        def score(self, model, qs, steers, prompt, batch_size, real_score=real_score):
            scored.append(list(qs))
            return real_score(self, model, qs, steers, prompt, batch_size)

        monkeypatch.setattr(type(METHODS[name]), "score", score)
    grids = {"caa": {"layer": [0.5], "multiplier": [1.0, 2.0]}, "sadi": {"k": [1, 2], "delta": [5.0]},
             "sadi-neuron": {"k": [3], "delta": [10.0, 30.0]}, "sadi-hidden": {"k": [1], "delta": [5.0, 10.0]}}
    res = run_bench(model, questions, methods=["caa", "sadi", "sadi-neuron", "sadi-hidden"], prompt="copa",
                    template="{question} {answer}", grids=grids, kl_texts=["A short neutral text."],
                    heads=AnswerActivations(model, questions, "{question} {answer}", cache=False), log=lambda s: None)
    tests = [{questions[i] for i in sp["test"]} for sp in res.config["splits"]]
    fold, kinds = -1, set()
    for kind, qs in events:
        if kind == "fold":
            fold += 1
            continue
        kinds.add(kind)
        assert tests[fold].isdisjoint(qs), f"fold {fold}: {kind} activations of a test item were read"
    assert kinds == {"z", "neuron", "hidden", "resid"} and fold == 1
    # selection scored only validation items; the test fold is scored once, with the chosen setting
    assert len(scored) == 2 * 4 * 2  # per fold and method: validation candidates, then the chosen one on test
    for f, t in enumerate(tests):
        for j, qs in enumerate(scored[f * 8:(f + 1) * 8]):
            assert set(qs) == t if j % 2 else t.isdisjoint(qs)
    assert all(sorted(res.per_question[m]) == list(range(12)) for m in res.per_question)
    assert res.config["feature_template"] == "{question} {answer}" and res.config["prompt_template"] == "{question}"
    assert "validation" in res.config["selection"]


def test_real_bench_reads_no_test_question_and_shares_one_relevance_per_fold(model, monkeypatch):
    import steerbench.benchmark as bm

    questions = sb.load_truthfulqa("misconceptions")[:12]
    heads = AnswerActivations(model, questions, cache=False)
    read: list = []
    real_of = heads.of
    heads.of = lambda qs: (read.append(list(qs)), real_of(qs))[1]
    fits = []
    real_fit = bm.HeadRelevance.fit

    def fit(*a, **k):
        fits.append(1)
        return real_fit(*a, **{**k, "epochs": 2, "gru_epochs": 1})

    monkeypatch.setattr(bm.HeadRelevance, "fit", fit)
    grids = {"real": {"k": [2], "alpha": [5.0]}, "real-probe": {"k": [2, 4], "alpha": [5.0]}}
    res = run_bench(model, questions, methods=["real", "real-probe"], prompt="plain", grids=grids,
                    kl_texts=["A short neutral text."], heads=heads, log=lambda s: None)
    assert len(fits) == 2  # one relevance per fold, both scorers, shared by the two methods
    trains = [{questions[i] for i in sp["train"]} for sp in res.config["splits"]]
    # every read is one fold's training questions (fit + validation), in fold order: never a test question
    assert [trains.index(set(qs)) for qs in read] == sorted(trains.index(set(qs)) for qs in read) and len(read) >= 2
    rows = {(r["method"], r["fold"]): r for r in res.folds}
    assert set(rows) == {(m, f) for m in ("real", "real-probe") for f in (0, 1)}
    assert all(r["describe"].startswith("REAL(") and r["params"]["k"] in (2, 4) for r in rows.values())
    assert all(len(rows[("real-probe", f)]["val"]) == 2 for f in (0, 1))  # chosen among two on validation
    assert all(sorted(res.per_question[m]) == list(range(12)) for m in ("real", "real-probe"))


def test_iti_bench_end_to_end_on_the_embedded_set(model, tmp_path):
    questions = sb.load_truthfulqa("misconceptions")[:16]
    res = run_bench(model, questions, methods=["baseline", "iti"], prompt="plain",
                    grids={"iti": {"k": [4], "alpha": [0.0, 10.0]}}, kl_texts=sb.datasets.neutral_texts()[:2],
                    heads=AnswerActivations(model, questions, cache=False), log=lambda s: None)
    table = res.summary()
    assert list(table.method) == ["baseline", "iti"]
    assert table.loc[0, "kl"] == 0.0 and table.loc[0, "chosen"] == "-; -"
    iti_rows = [r for r in res.folds if r["method"] == "iti"]
    for r in iti_rows:
        assert [v["params"]["alpha"] for v in r["val"]] == [0.0, 10.0]
        best = max(r["val"], key=lambda v: v["mc2"])
        assert r["params"]["alpha"] == best["params"]["alpha"] or r["val"][0]["mc2"] == r["val"][1]["mc2"]
        assert (r["kl"] > 0) == (r["params"]["alpha"] > 0)
        if r["params"]["alpha"] == 0:  # alpha 0 chosen: identical to the baseline, question for question
            base = [b for b in res.folds if b["method"] == "baseline" and b["fold"] == r["fold"]][0]
            assert r["mc2"] == base["mc2"]
    data = json.loads(res.to_json(tmp_path / "r.json").read_text())
    assert {s["method"] for s in data["summary"]} == {"baseline", "iti"}
    fig = res.figure()
    assert {t.name for t in fig.data} == {"baseline", "iti"}


def test_grid_overrides_parse_and_refuse_typos():
    assert parse_grid(["iti.k=8,16", "iti.alpha=15"]) == {"iti": {"k": [8, 16], "alpha": [15.0]}}
    with pytest.raises(ValueError, match="unknown method 'itti'"):
        parse_grid(["itti.k=8"])
    with pytest.raises(ValueError, match="has no parameter 'K'"):
        parse_grid(["iti.K=8"])
    with pytest.raises(ValueError, match="takes float values"):  # a head count: a share below 1, or a count
        parse_grid(["iti.k=eight"])
    with pytest.raises(ValueError, match="takes int values"):
        parse_grid(["sadi.k=eight"])
    with pytest.raises(ValueError, match="method.param=v1,v2"):
        parse_grid(["iti"])
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(None, [], methods=["nope"])


def test_max_kl_rules_out_settings_that_move_the_model_too_far(model):
    questions = sb.load_truthfulqa("misconceptions")[:12]
    heads = AnswerActivations(model, questions, cache=False)
    res = run_bench(model, questions, methods=["iti"], prompt="plain", grids={"iti": {"k": [4], "alpha": [0.0, 40.0]}},
                    kl_texts=sb.datasets.neutral_texts()[:1], heads=heads, max_kl=1e-6, log=lambda s: None)
    for r in res.folds:
        assert r["params"]["alpha"] == 0.0 and r["kl"] == 0.0
        assert r["val"][0]["kl"] == 0.0 and r["val"][1]["kl"] > 1e-6


def test_with_nothing_within_the_kl_budget_the_best_of_the_least_kl_settings_is_chosen(model):
    questions = sb.load_truthfulqa("misconceptions")[:12]
    heads = AnswerActivations(model, questions, cache=False)
    # FASB's KL does not depend on the threshold: both thresholds at alpha 5 tie on KL
    grid = {"k": [4], "alpha": [5.0, 40.0], "readout": ["plain"], "threshold": [0.0, 1.0], "backtrack": [2]}
    res = run_bench(model, questions, methods=["fasb"], prompt="plain", grids={"fasb": grid},
                    kl_texts=sb.datasets.neutral_texts()[:1], heads=heads, max_kl=1e-9, log=lambda s: None)
    for r in res.folds:
        mild = [v for v in r["val"] if v["params"]["alpha"] == 5.0]
        assert len(mild) == 2 and mild[0]["kl"] == mild[1]["kl"] < min(v["kl"] for v in r["val"] if v not in mild)
        assert r["params"] == max(mild, key=lambda v: v["mc2"])["params"]


def test_fasb_readouts_and_thresholds_see_no_test_answer(model, monkeypatch):
    """Issue 20: the new readouts are fitted on the fit answers' tokens and every threshold
    is chosen on the validation answers' tokens; no test answer reaches either."""
    import steerbench.benchmark as bm

    questions = sb.load_truthfulqa("misconceptions")[:12]
    reads: list = []
    real = bm.answer_tokens

    def spy(model, qs, heads, prompt, **kw):
        reads.append(list(qs))
        return real(model, qs, heads, prompt, **kw)

    monkeypatch.setattr(bm, "answer_tokens", spy)
    grid = {"k": [4], "alpha": [5.0], "readout": ["plain", "calibrated", "prefix"], "threshold": ["val"],
            "backtrack": [2]}
    res = run_bench(model, questions, methods=["fasb"], prompt="plain", grids={"fasb": grid},
                    kl_texts=["A short neutral text."], heads=AnswerActivations(model, questions, cache=False),
                    log=lambda s: None)
    splits = res.config["splits"]
    assert len(reads) == 4  # fit and validation tokens, once per fold, shared by the readouts
    for f, sp in enumerate(splits):
        fit, val = ({questions[i] for i in sp[part]} for part in ("fit", "val"))
        assert sorted(map(len, reads[2 * f : 2 * f + 2])) == sorted(map(len, (fit, val)))
        assert {frozenset(r) for r in reads[2 * f : 2 * f + 2]} == {frozenset(fit), frozenset(val)}
        assert not ({questions[i] for i in sp["test"]} & (fit | val))
    for r in res.folds:
        assert len(r["val"]) == 3 and r["describe"].startswith("FASB(")
        chosen = [v["params"] for v in r["val"] if v["params"].get("threshold_from") == "val"]
        assert [p["readout"] for p in chosen] == ["plain", "calibrated", "prefix"]
        assert all(0 < p["threshold"] < 1 for p in chosen)


def test_fasb_threshold_settings_parse_val_or_a_probability():
    assert parse_grid(["fasb.threshold=val,0.4"]) == {"fasb": {"threshold": ["val", 0.4]}}
    assert parse_grid(["fasb.readout=prefix"]) == {"fasb": {"readout": ["prefix"]}}
    with pytest.raises(sb.errors.ParameterError, match="'val' or a number"):
        parse_grid(["fasb.threshold=high"])
    with pytest.raises(sb.errors.ParameterError, match="between 0 and 1"):
        parse_grid(["fasb.threshold=val,1.5"])
    with pytest.raises(sb.errors.ParameterError, match="one of plain, calibrated, prefix"):
        parse_grid(["fasb.readout=oracle"])
