import math

import pytest
import torch

import steerbench as sb
from steerbench.datasets import MCQuestion
from steerbench.truthfulqa import PROMPTS, mc_metrics, mc_score, mc_scores


def test_mc_metrics_on_known_log_probabilities():
    true_lp, false_lp = [-1.0, -3.0, -0.5], [-2.0, -0.7]
    mc1, mc2, mc3 = mc_metrics(true_lp, false_lp, best=0)
    assert mc1 == 0.0  # best (-1.0) loses to -0.7
    e = [math.exp(x) for x in true_lp + false_lp]
    assert mc2 == pytest.approx(sum(e[:3]) / sum(e), abs=1e-12)
    assert mc3 == pytest.approx(1 / 3)  # only -0.5 beats -0.7
    assert mc_metrics([-0.1], [-5.0, -6.0]) == (1.0, pytest.approx(1 / (1 + math.exp(-4.9) + math.exp(-5.9))), 1.0)
    with pytest.raises(ValueError, match="at least one true and one false"):
        mc_metrics([], [-1.0])
    with pytest.raises(ValueError, match="best=3"):
        mc_metrics([-1.0], [-2.0], best=3)


@pytest.mark.parametrize("prompt,n,batch_size", [("plain", 3, 16), ("instruction+primer", 2, 5)])
def test_batched_scoring_equals_naive_one_answer_at_a_time(any_model, prompt, n, batch_size):
    model = any_model  # each model family in turn
    # the primer is computed once for all batches and shared (SharedPrefix); batch_size 5 splits
    # a question's answers across batches
    questions = sb.load_truthfulqa("misconceptions")[:n]
    res = mc_score(model, questions, prompt=prompt, batch_size=batch_size)
    per_q = []
    for q in questions:
        ids = model.encode(PROMPTS[prompt].format(question=q.question))
        scores = []
        for a in (*q.correct, *q.incorrect):
            ans = model.encode(" " + a, bos=False)
            with torch.no_grad():
                logits = model.hf_model(torch.tensor([ids + ans])).logits[0]
            ls = torch.log_softmax(logits[len(ids) - 1 : -1].double(), -1)
            scores.append(float(ls.gather(-1, torch.tensor(ans)[:, None]).sum()))
        per_q.append(mc_metrics(scores[: len(q.correct)], scores[len(q.correct):], q.correct.index(q.best)))
    for got, want in zip(res.per_question, per_q):
        assert got[0] == want[0] and got[2] == want[2]
        assert abs(got[1] - want[1]) < 1e-4


def test_steering_changes_scores_and_strength_zero_does_not(any_model, any_caa):
    model, caa = any_model, any_caa  # each model family in turn
    questions = sb.load_truthfulqa("misconceptions")[:4]
    base, zero, steered = mc_scores(model, questions, [None, caa.scaled(0), caa.scaled(8)], prompt="plain")
    assert zero.per_question == base.per_question
    assert steered.per_question != base.per_question


def test_bad_prompt_and_empty_input(model):
    q = MCQuestion("Why?", "Because.", ("Because.",), ("No reason.",))
    with pytest.raises(ValueError, match="contain '\\{question\\}'"):
        mc_score(model, [q], prompt="no placeholder")
    with pytest.raises(ValueError, match="no questions"):
        mc_score(model, [])


def test_partial_scoring_of_winogrande_equals_naive_scoring(model):
    """Each option's sentence up to the blank is the prompt; the shared rest is scored."""
    from steerbench.datasets import load_mc

    items = load_mc("winogrande")[:3]
    res = mc_score(model, items, prompt="winogrande")
    for q, got in zip(items, res.per_question):
        scores = []
        for ctx, ans, _ in q.answers():
            ids = model.encode(q.question + ctx)
            cont = model.encode(" " + ans, bos=False)
            with torch.no_grad():
                logits = model.hf_model(torch.tensor([ids + cont])).logits[0]
            ls = torch.log_softmax(logits[len(ids) - 1 : -1].double(), -1)
            scores.append(float(ls.gather(-1, torch.tensor(cont)[:, None]).sum()))
        assert got[0] == float(scores[0] > scores[1])
        assert abs(got[1] - 1 / (1 + math.exp(scores[1] - scores[0]))) < 1e-4


def test_generate_answers_is_the_bench_prompt_without_copying_it(model, caa):
    from steerbench.model import Prompt
    from steerbench.truthfulqa import generate_answers

    qs = sb.load_truthfulqa("misconceptions")[:2]
    got = generate_answers(model, qs, caa.scaled(4), max_new_tokens=8)
    for q, g in zip(qs, got):  # one question at a time, no shared prefix: the same tokens
        ids = model.encode(PROMPTS["instruction+primer"].format(question=q.question))
        alone = sb.generate(model, Prompt(ids, steer_from=len(ids) - 1), steer=caa.scaled(4), max_new_tokens=8,
                            stop=("\n",))
        assert g.tokens == alone.tokens and "\n" not in g.text
    with pytest.raises(sb.ParameterError, match="template"):
        generate_answers(model, qs, prompt="no placeholder")


def test_head_sweep_steers_one_head_at_a_time_and_alpha_zero_is_unsteered(model, head_probes):
    from steerbench.truthfulqa import head_sweep, mc_score

    qs = sb.load_truthfulqa("misconceptions")[20:22]  # not among the probes' fit questions
    heads = [(0, 0), (12, 4)]
    df = head_sweep(model, head_probes, qs, alphas=[0.0, 8.0], heads=heads, prompt="plain")
    assert list(zip(df.layer, df["head"], df.alpha)) == [(0, 0, 0.0), (0, 0, 8.0), (12, 4, 0.0), (12, 4, 8.0)]
    assert (df[df.alpha == 0].d_mc2 == 0).all() and df.attrs["seconds"] > 0
    alone = mc_score(model, qs, head_probes.on([(12, 4)], 8.0), prompt="plain")
    assert df.iloc[3].mc2 == pytest.approx(alone.mc2, abs=1e-6)
    assert df.iloc[3].probe_rank == head_probes.ranking().index((12, 4)) + 1
    with pytest.raises(sb.ParameterError, match="within"):
        head_sweep(model, head_probes, qs, heads=[(99, 0)])
    with pytest.raises(ValueError, match="no questions"):
        head_sweep(model, head_probes, [])


def test_head_sweep_explorer_draws_both_grids_and_a_clicked_heads_curve():
    import pandas as pd

    from steerbench import plots, widgets

    rows = [{"layer": L, "head": h, "alpha": 5.0, "mc1": 0.2, "mc2": 0.5 + 0.01 * (L - h), "mc3": 0.2,
             "d_mc2": 0.01 * (L - h), "probe_val_acc": 0.6, "probe_rank": 1 + L * 3 + h} for L in range(2) for h in range(3)]
    sweep = pd.DataFrame(rows)
    sweep.attrs["unsteered"] = {"mc2": 0.5}
    calls = []

    def curve(layer, head):
        calls.append((layer, head))
        return pd.DataFrame([{**rows[0], "layer": layer, "head": head, "alpha": a, "d_mc2": 0.01 * a} for a in (1, 5)])

    app = widgets.HeadSweepExplorer(sweep, curve)
    assert len(app.grid_figure.data) == 2 and app.grid_figure.data[1].z[1][0] == pytest.approx(0.01)
    got = app.select(1, 2)
    app.select(1, 2)
    assert calls == [(1, 2)] and list(got.alpha) == [1, 5]  # computed on the first click, then kept
    assert list(app.curve_figure.data[0].y) == [0.01, 0.05] and len(app.grid_figure.layout.shapes) == 2
    with pytest.raises(ValueError, match="not in the sweep"):
        app.select(5, 0)
    with pytest.raises(ValueError, match="no alpha 2"):
        plots.head_sweep_grid(sweep, alpha=2.0)
