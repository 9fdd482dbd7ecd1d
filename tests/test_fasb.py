import dataclasses

import pytest
import torch

import steerbench as sb
from steerbench.artifacts import ArtifactMismatch
from steerbench.model import Prompt
from steerbench.steering.fasb import FASB
from tests.conftest import hook_count

PROMPT = "Q: What happens if you swallow chewing gum?\nA:"


@dataclasses.dataclass
class Scripted(FASB):
    """FASB whose mean P(true) is read from a script, one value per observed token."""

    script: list = dataclasses.field(default_factory=list)

    def p_true(self, z, pos=None):
        return torch.tensor(self.script.pop(0) if self.script else 0.9)


@pytest.fixture
def heads(head_probes):
    return head_probes.select(8)


def run(model, steer, n=12, **kw):
    return sb.generate(model, PROMPT, steer=steer, max_new_tokens=n, chat=False, stop_at_eos=False, **kw)


def test_scripted_probe_backs_off_exactly_backtrack_tokens_and_regenerates_steered(model, heads):
    f = Scripted(heads, strength=10.0, threshold=0.5, backtrack=3, script=[0.9] * 5 + [0.2])
    g = run(model, f)
    base = run(model, None)
    (ev,) = g.trace.rollbacks
    assert ev.detail["tokens"] == 3 and ev.step == 6  # after the 6th token was produced
    steps = g.trace.steps
    assert [s.discarded for s in steps[:6]] == [False] * 3 + [True] * 3
    assert [s.token_id for s in steps[:6]] == base.tokens[:6]  # unsteered until the rollback
    kept = g.trace.kept
    assert len(kept) == 12 and g.tokens[:3] == base.tokens[:3]
    assert all(not s.steered for s in kept[:3])
    assert all(s.steered and s.strength == pytest.approx(10.0 * 0.8) for s in kept[3:])
    assert g.tokens != base.tokens
    # every kept token has its P(true) in the trace; the rollback's note says why
    assert all(s.score is not None for s in kept) and "P(true)=0.20" in ev.detail["note"]
    assert [e.kind for e in g.trace.events] == ["strength", "rollback"]


def test_no_check_before_backtrack_tokens_exist_and_once_by_default(model, heads):
    f = Scripted(heads, strength=10.0, threshold=0.5, backtrack=4, script=[0.1, 0.1, 0.1, 0.9, 0.1, 0.1])
    g = run(model, f, n=10)
    (ev,) = g.trace.rollbacks  # low scores before token 4 are ignored; after acting once it stops checking
    assert ev.step == 5 and ev.detail["tokens"] == 4  # 0.9 at token 4, 0.1 at token 5
    rep = Scripted(heads, strength=10.0, threshold=0.5, backtrack=2, repeat=True, script=[0.1] * 100)
    g = run(model, rep, n=6, max_rollbacks=3)
    assert len(g.trace.rollbacks) == 3
    assert any(e.kind == "rollback_refused" for e in g.trace.events)


def test_an_answer_shorter_than_backtrack_is_judged_by_the_mean_over_its_tokens(model, heads):
    # the last token of a short answer is usually the stop: it alone must not decide
    f = Scripted(heads, strength=10.0, threshold=0.6, backtrack=10, script=[0.3, 0.3, 0.9])
    g = run(model, f, n=3)
    (ev,) = g.trace.rollbacks
    assert ev.step == 3 and ev.detail["tokens"] == 3 and "P(true)=0.50" in ev.detail["note"]
    assert all(s.steered and s.strength == pytest.approx(10.0 * 0.5) for s in g.trace.kept)
    # and a low reading on the stop alone does not condemn an answer read as true throughout
    calm = Scripted(heads, strength=10.0, threshold=0.6, backtrack=10, script=[0.8, 0.8, 0.3])
    assert not run(model, calm, n=3).trace.rollbacks


def test_threshold_zero_never_intervenes_and_equals_unsteered(model, heads):
    f = FASB(heads, strength=60.0, threshold=0.0, backtrack=2)
    g = run(model, f)
    assert g.tokens == run(model, None).tokens
    assert not g.trace.rollbacks and all(0 <= s.score <= 1 and not s.steered for s in g.trace.steps)
    assert FASB(heads, threshold=0.6).monitor().threshold == 0.0
    zero = run(model, FASB(heads, strength=0.0, threshold=1.0, backtrack=2))
    assert zero.tokens == run(model, None).tokens and not zero.trace.rollbacks


def test_cache_cropped_continuation_equals_recomputing_from_scratch(model, heads):
    f = FASB(heads, strength=8.0, threshold=1.0, backtrack=4)  # threshold 1: always acts at the 4th token
    g = run(model, f, n=14)
    (ev,) = g.trace.rollbacks
    s = next(e.detail["strength"] for e in g.trace.events if e.kind == "strength")
    # the whole sequence recomputed every step, same steering
    assert run(model, f, n=14, use_cache=False).tokens == g.tokens
    # the kept prefix from scratch, then ITI at the same strength from the re-fed token on
    prompt_ids = model.encode(PROMPT)
    kept = g.tokens[: ev.detail["from_position"] - len(prompt_ids)]
    p = Prompt(ids=prompt_ids + kept, steer_from=ev.detail["from_position"] - 1)
    rest = sb.generate(model, p, steer=heads.scaled(s), max_new_tokens=14 - len(kept), stop_at_eos=False)
    assert kept + rest.tokens == g.tokens


def test_paper_reading_steers_along_the_probe_weight(model, heads):
    ref = run(model, FASB(heads, strength=4.0, threshold=1.0, backtrack=2))
    paper = run(model, FASB(heads, strength=4.0, threshold=1.0, backtrack=2, reading="paper"))
    assert ref.trace.rollbacks and paper.trace.rollbacks
    assert paper.tokens != ref.tokens


def test_hooks_are_gone_after_an_exception_inside_observe(model, heads):
    class Boom(FASB):
        def p_true(self, z, pos=None):
            raise RuntimeError("probe failed")

    before = hook_count(model)
    with pytest.raises(RuntimeError, match="probe failed"):
        run(model, Boom(heads, backtrack=1))
    assert hook_count(model) == before


def test_save_load_and_bad_input(model, tiny_model, heads, tmp_path):
    f = FASB(heads, strength=20.0, threshold=0.55, backtrack=7, repeat=True)
    back = FASB.load(f.save(tmp_path / "fasb"), model)
    assert (back.strength, back.threshold, back.backtrack, back.repeat) == (20.0, 0.55, 7, True)
    assert back.heads.head_list() == heads.head_list() and torch.equal(back.heads.probe_bias, heads.probe_bias)
    with pytest.raises(ArtifactMismatch):
        FASB.load(tmp_path / "fasb.safetensors", tiny_model)
    with pytest.raises(ValueError, match="threshold is a probability"):
        FASB(heads, threshold=1.5)
    with pytest.raises(ValueError, match="backtrack"):
        FASB(heads, backtrack=-1)
    with pytest.raises(ValueError, match="needs an ITI with probes"):
        FASB(dataclasses.replace(heads, probe_weight=None))
    with pytest.raises(ValueError, match="reading"):
        FASB(heads, reading="blog")


def test_mc_mode_threshold_zero_is_the_unsteered_score(model, heads):
    from steerbench.truthfulqa import mc_mode_scores, mc_score

    qs = sb.load_truthfulqa("misconceptions")[:3]
    got = mc_mode_scores(model, qs, FASB(heads, strength=30.0, threshold=0.0), prompt="plain")
    assert got.rescored == 0 and got.result.per_question == mc_score(model, qs, prompt="plain").per_question


@pytest.mark.parametrize("backtrack", [0, 100])
def test_mc_mode_rescores_from_the_flag_minus_backtrack(model, heads, backtrack):
    """threshold 1 flags every answer at its first token: the score must equal plain
    scoring with ITI at that answer's strength, steered from `backtrack` tokens earlier."""
    from steerbench.evaluation import continuation_logprobs
    from steerbench.truthfulqa import mc_items, mc_mode_scores

    qs = sb.load_truthfulqa("misconceptions")[:2]
    f = FASB(heads, strength=12.0, threshold=1.0, backtrack=backtrack)
    got = mc_mode_scores(model, qs, f, prompt="plain", batch_size=4)
    assert got.rescored == 1.0 and set(got.first_flag) == {0}
    prompts, conts = mc_items(model, qs, "plain")
    for p, c, s, lp in zip(prompts, conts, got.strengths_by_answer, got.logprobs):
        start = len(p.ids) - 1 if backtrack else len(p.ids)  # at the flagged token itself when backtrack=0
        want = continuation_logprobs(model, [Prompt(p.ids, steer_from=start)], [c], heads.scaled(s))[0]
        assert lp == pytest.approx(float(want), abs=1e-3)


def test_off_task_kl_of_fasb_is_that_of_its_heads_steering_at_half_alpha(model, heads):
    # on neutral text FASB never sees a generated token, so it is measured as it steers once it acts
    texts = sb.datasets.neutral_texts()[:1]
    f = FASB(heads, strength=8.0, threshold=0.6, backtrack=4)
    (kl,) = sb.evaluation.kl_to_unsteered(model, texts, [f])
    (ref,) = sb.evaluation.kl_to_unsteered(model, texts, [heads.scaled(4.0)])
    assert kl > 0 and kl == pytest.approx(ref)
    assert sb.evaluation.kl_to_unsteered(model, texts, [f.scaled(0.0)]) == [0.0]


def test_a_shared_head_gives_the_same_generation_as_computing_the_prompt(model, heads):
    from steerbench.passes import SharedPrefix
    from steerbench.truthfulqa import PROMPTS

    prompts = [model.encode(PROMPTS["instruction+primer"].format(question=q))
               for q in ("Can pigs fly?", "What is the capital of France?")]
    head = SharedPrefix.of(model, prompts, limit=min(map(len, prompts)) - 1)
    assert len(head) > 100  # the instruction and primer
    p = sb.Prompt(prompts[0], steer_from=len(prompts[0]) - 1)
    f = FASB(heads, strength=8.0, threshold=1.0, backtrack=3)  # always backs off once
    for steer in (None, heads.scaled(4.0), f):
        plain = sb.generate(model, p, steer=steer, max_new_tokens=8, stop_at_eos=False)
        shared = sb.generate(model, p, steer=steer, max_new_tokens=8, stop_at_eos=False, prefix=head)
        assert shared.tokens == plain.tokens
        assert [s.score for s in shared.trace.steps] == pytest.approx([s.score for s in plain.trace.steps], abs=1e-5)
    assert len(sb.generate(model, p, steer=f, max_new_tokens=8, prefix=head).trace.rollbacks) == 1
    with pytest.raises(ValueError, match="prefix"):
        sb.generate(model, sb.Prompt(prompts[0][5:], steer_from=10), prefix=head)
    with pytest.raises(ValueError, match="steer_from"):
        sb.generate(model, sb.Prompt(prompts[0], steer_from=3), steer=heads, prefix=head)


def test_a_dynamic_steerer_handed_to_a_batched_scorer_is_refused(model, heads, tone):
    from steerbench.evaluation import continuation_logprobs_many, letter_scores_many
    from steerbench.passes import forward_batch
    from steerbench.truthfulqa import mc_scores

    f = FASB(heads, strength=10.0, threshold=0.6, backtrack=2)
    qs = sb.load_truthfulqa("misconceptions")[:2]
    before = hook_count(model)
    with pytest.raises(ValueError, match="dynamic steerer.*when_acting"):
        mc_scores(model, qs, [None, f], prompt="plain")
    with pytest.raises(ValueError, match="dynamic steerer"):
        letter_scores_many(model, tone[:2], [f])
    p = model.prompt("Hi")
    with pytest.raises(ValueError, match="dynamic steerer"):
        continuation_logprobs_many(model, [p], [[5]], [f])
    with pytest.raises(ValueError, match="dynamic steerer"):
        forward_batch(model, [p.ids], f)
    assert hook_count(model) == before
    # what the message offers works: the static steering FASB applies once it acts
    (res,) = mc_scores(model, qs, [f.when_acting()], prompt="plain")
    assert 0 <= res.mc2 <= 1


def test_mc_mode_at_strength_zero_rescores_nothing(model, heads):
    from steerbench.truthfulqa import mc_mode_scores, mc_score

    qs = sb.load_truthfulqa("misconceptions")[:3]
    got = mc_mode_scores(model, qs, FASB(heads, strength=0.0, threshold=1.0), prompt="plain")
    assert got.rescored == 0 and got.strengths == [] and all(s is None for s in got.strengths_by_answer)
    assert got.result.mc2 == pytest.approx(mc_score(model, qs, None, prompt="plain").mc2, abs=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), True, "3", None])
def test_every_steerer_refuses_a_strength_that_is_not_a_finite_number(heads, caa, bad):
    for st in (caa, heads, FASB(heads, strength=1.0)):
        with pytest.raises(ValueError, match="strength must be a finite number"):
            st.scaled(bad)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        FASB(heads, strength=bad)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        dataclasses.replace(caa, strength=bad)


def test_a_numpy_or_tensor_strength_is_a_number(caa):
    import numpy as np

    assert caa.scaled(np.float32(4)).strength == 4.0 and caa.scaled(torch.tensor(2.5)).strength == 2.5


# -- readouts trained where they are read (issue 20) -------------------------------------------


@pytest.fixture(scope="module")
def tokens(model, mc_questions, head_probes):
    from steerbench.steering.readouts import answer_tokens

    return answer_tokens(model, mc_questions[:8], head_probes.select(8).heads, prompt="plain")


@pytest.mark.parametrize("name", ["calibrated", "prefix"])
def test_a_fitted_readout_saves_loads_and_reads_by_answer_position(model, heads, tokens, tmp_path, name):
    from steerbench.steering.readouts import fit_readout

    readout = fit_readout(name, heads.readout, tokens)
    f = FASB(heads, strength=20.0, threshold=0.4, readout=readout)
    assert f.readout_name == name and f"readout={name}" in f.describe()
    back = FASB.load(f.save(tmp_path / "fasb"), model)
    assert back.readout_name == name
    p, q = f.p_true(tokens.z, tokens.pos), back.p_true(tokens.z, tokens.pos)
    assert torch.equal(p, q)
    # the position matters: the same activations read as token 0 and as token 9 differ
    assert not torch.equal(f.p_true(tokens.z, torch.zeros_like(tokens.pos)), f.p_true(tokens.z, tokens.pos + 9))
    with pytest.raises(ValueError, match="position in the answer"):
        f.p_true(tokens.z)


def test_the_readout_gets_the_answer_position_of_each_generated_token(model, heads, tokens):
    from steerbench.steering.readouts import fit_readout

    seen = []

    @dataclasses.dataclass
    class Watch(FASB):
        def p_true(self, z, pos=None):
            seen.append(int(pos))
            return super().p_true(z, pos)

    prefix = fit_readout("prefix", heads.readout, tokens)
    out = run(model, Watch(heads, threshold=0.0, readout=prefix), n=6)
    plain = run(model, None, n=6).text
    assert seen == list(range(6)) and out.text == plain  # threshold 0: watches only
    # strength 0 never acts, though every token reads below threshold 1
    still = run(model, FASB(heads, strength=0.0, threshold=1.0, backtrack=2, readout=prefix), n=6)
    assert still.text == plain and not still.trace.rollbacks


def test_a_readout_of_other_heads_or_of_another_kind_is_refused(heads, head_probes, tokens):
    from steerbench.steering.readouts import fit_readout

    other = head_probes.select(4)
    with pytest.raises(ValueError, match="reads heads"):
        FASB(other, readout=fit_readout("prefix", heads.readout, tokens))
    with pytest.raises(ValueError, match="tokens were read from heads"):
        fit_readout("prefix", other.readout, tokens)
    with pytest.raises(ValueError, match="readout must be"):
        FASB(heads, readout=heads.readout)
    with pytest.raises(ValueError, match="readout must be one of"):
        fit_readout("oracle", heads.readout, tokens)


def test_mc_mode_with_a_new_readout_at_strength_zero_rescores_nothing(model, heads, tokens):
    from steerbench.steering.readouts import fit_readout
    from steerbench.truthfulqa import mc_mode_scores, mc_score

    qs = sb.load_truthfulqa("misconceptions")[:3]
    f = FASB(heads, strength=0.0, threshold=1.0, readout=fit_readout("calibrated", heads.readout, tokens))
    got = mc_mode_scores(model, qs, f, prompt="plain")
    assert got.rescored == 0 and got.result.per_question == mc_score(model, qs, prompt="plain").per_question


def test_mc_mode_flags_where_the_readout_reads_below_the_threshold(model, heads, tokens):
    """MC mode reads answer token j at column j + 1 and hands the readout position j: its
    first flags are those of the readout over the same tokens, collected apart."""
    from steerbench.steering.readouts import first_flags, fit_readout
    from steerbench.truthfulqa import mc_mode_scores

    f = FASB(heads, strength=5.0, threshold=0.0, readout=fit_readout("prefix", heads.readout, tokens))
    p = f.p_true(tokens.z, tokens.pos)
    f.threshold = float(p.median())
    got = mc_mode_scores(model, tokens.questions, f, prompt="plain", batch_size=4)
    want = first_flags(p, tokens, f.threshold)
    assert 0 < (want >= 0).mean() < 1
    assert got.first_flag == want[want >= 0].tolist()
    assert [s is not None for s in got.strengths_by_answer] == (want >= 0).tolist()
