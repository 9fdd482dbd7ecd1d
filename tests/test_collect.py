import pytest
import torch

import steerbench as sb

TEXTS = ["The cat sat on the mat.", "Hi there", "A much longer sentence about steering vectors and models.", "Why?"]
HOOKS = ["blocks.2.hook_resid_post", "blocks.5.attn.hook_z"]


def manual(model, text, hook):
    ids = torch.tensor([model.encode(text)])
    _, cache = model.bridge.run_with_cache(ids, prepend_bos=False, names_filter=[hook])
    return cache[hook][0]


@pytest.mark.parametrize("position", ["last", -2, "mean"])
def test_batched_equals_one_at_a_time_and_plain_cache(any_model, position):
    model = any_model  # each model family in turn
    batched = sb.collect(model, TEXTS, HOOKS, position=position, batch_size=4)
    single = sb.collect(model, TEXTS, HOOKS, position=position, batch_size=1)
    for h in HOOKS:
        assert torch.allclose(batched[h], single[h], atol=1e-4)
        for i, text in enumerate(TEXTS):
            full = manual(model, text, h)
            want = full.mean(0) if position == "mean" else full[-1 if position == "last" else position]
            assert torch.allclose(single[h][i], want, atol=1e-4)


def test_shapes_all_positions_and_spans(any_model):
    model = any_model  # each model family in turn
    acts = sb.collect(model, TEXTS, HOOKS, position="all")
    lens = [len(model.encode(t)) for t in TEXTS]
    assert [a.shape[0] for a in acts["blocks.2.hook_resid_post"]] == lens
    assert acts["blocks.5.attn.hook_z"][0].shape == (lens[0], model.n_heads, model.d_head)
    spans = [(1, 3), (0, None), (2, 4), (0, 1)]
    m = sb.collect(model, TEXTS, ["blocks.2.hook_resid_post"], position="mean", spans=spans)
    for i, (s, e) in enumerate(spans):
        want = acts["blocks.2.hook_resid_post"][i][s:e].mean(0)
        assert torch.allclose(m["blocks.2.hook_resid_post"][i], want, atol=1e-4)


PREFIX = ("Answer each question truthfully and in one sentence. Q: What is the capital of France? "
          "A: Paris is the capital of France. Q: ")
ASKED = ["Why is the sky blue?", "Who wrote Hamlet?", "What do cats eat when they are hungry at night?"]


@pytest.mark.parametrize("position", ["last", -2, "mean", "all"])
def test_a_prefix_every_text_shares_runs_once_with_the_same_activations(any_model, position, monkeypatch):
    model = any_model  # each model family in turn
    texts = [PREFIX + q for q in ASKED]
    n_prefix = sb.SharedPrefix.common_length([model.encode(t) for t in texts], 10**6)
    assert n_prefix >= sb.activations.MIN_SHARED_PREFIX
    spans = [(n_prefix + 1, None)] * len(texts) if position in ("mean", "all") else None
    widths: list[int] = []
    monkeypatch.setattr(sb.activations, "_store", lambda dest, act, *a, _s=sb.activations._store, **k: (
        widths.append(act.shape[1]), _s(dest, act, *a, **k)))
    shared = sb.collect(model, texts, HOOKS, position=position, spans=spans, batch_size=2)
    assert max(widths) <= max(len(model.encode(t)) for t in texts) - n_prefix  # hooks saw only the rest
    plain = sb.collect(model, texts, HOOKS, position=position, spans=spans, batch_size=2, share_prefix=False)
    for h in HOOKS:
        for i, text in enumerate(texts):
            full = manual(model, text, h)
            if position == "all":
                want = full[spans[i][0]:]
            else:
                want = full[spans[i][0]:].mean(0) if position == "mean" else full[-1 if position == "last" else position]
            assert torch.allclose(shared[h][i], want, atol=1e-4)
        x, y = (torch.cat(shared[h]), torch.cat(plain[h])) if position == "all" else (shared[h], plain[h])
        assert (x - y).abs().max() <= 1e-5 * y.abs().max()  # float rounding only


def test_a_position_inside_the_shared_prefix_runs_whole_texts(model):
    texts = [PREFIX + q for q in ASKED]
    spans = [(0, None)] * len(texts)  # the mean over every token, the prefix's too
    acts = sb.collect(model, texts, ["blocks.2.hook_resid_post"], position="mean", spans=spans)
    for i, text in enumerate(texts):
        assert torch.allclose(acts["blocks.2.hook_resid_post"][i], manual(model, text, "blocks.2.hook_resid_post").mean(0),
                              atol=1e-4)


def test_aliases_of_one_hook_point_are_both_returned(model):
    acts = sb.collect(model, TEXTS[:2], ["blocks.1.attn.hook_z", "blocks.1.attn.o.hook_in"])
    assert torch.equal(acts["blocks.1.attn.hook_z"], acts["blocks.1.attn.o.hook_in"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": []}, "no inputs"),
        ({"hooks": ["blocks.99.hook_resid_post"]}, "unknown hook name"),
        ({"hooks": []}, "at least one hook"),
        ({"position": 3}, "must be negative"),
        ({"position": "first"}, "position must be"),
        ({"position": -40}, "before the start"),
        ({"position": "mean", "spans": [(0, 100)] * 4}, "outside"),
        ({"inputs": [""]}, "empty text"),
    ],
)
def test_bad_input(model, kwargs, message):
    args = {"inputs": TEXTS, "hooks": HOOKS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        sb.collect(model, args.pop("inputs"), args.pop("hooks"), **args)


def test_batches_keep_rows_times_width_under_the_token_budget():
    from steerbench.passes import length_batches

    lengths = [5, 600, 10, 300, 7, 600, 250, 250]
    batches = length_batches(lengths, batch_size=3, max_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000)
    assert [lengths[b[0]] for b in batches] == sorted(lengths[b[0]] for b in batches)  # shortest first
    assert length_batches([4000, 5000], 16, max_tokens=1000) == [[0], [1]]  # a long row still runs, alone
    assert length_batches([3] * 5, 2) == [[0, 1], [2, 3], [4]]
