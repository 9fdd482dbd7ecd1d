import json

import pytest

import steerbench as sb
from steerbench.datasets import MC_SETS, DatasetError, load_ab, load_mc, mc_set


def write(tmp_path, data, name="d.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


GOOD = {"question": "Do you like tea?\n\nChoices:\n (A) Yes, a lot\n (B) Not at all",
        "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}


def test_parses_choices_and_stem(tmp_path):
    (item,) = load_ab(write(tmp_path, [GOOD]))
    assert item.stem == "Do you like tea?"
    assert item.matching == "A" and item.matching_text == "Yes, a lot"
    assert item.not_matching_text == "Not at all"


@pytest.mark.parametrize("path", ["refusal", "corrigible-neutral-HHH", "sycophancy", "myopic-reward"])
def test_loads_every_caa_generate_file(path):
    items = sb.behavior(path, "train", source="caa")
    assert len(items) > 100
    assert all(it.matching_text and it.not_matching_text and it.stem for it in items)


def test_embedded_behaviours_have_train_test_and_open_splits():
    assert {"tone", "refusal"} <= set(sb.datasets.behaviors())
    for name in ("tone", "refusal"):
        train, test = sb.behavior(name, "train"), sb.behavior(name, "test")
        assert len(train) >= 50 and len(test) >= 20
        assert not {t.question for t in train} & {t.question for t in test}
        assert len(sb.behavior(name, "open")) >= 10


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "has no items"),
        ("{not json", "not valid JSON"),
        ({"question": "x"}, "expected a JSON list"),
        ([{"question": "Q?\n (A) a\n (B) b", "answer_matching_behavior": "(A)"}], "missing field"),
        ([{**GOOD, "answer_not_matching_behavior": "(A)"}], "both \\(A\\)"),
        ([{**GOOD, "answer_matching_behavior": "maybe"}], "must be a letter"),
        ([{**GOOD, "answer_matching_behavior": "(C)"}], "lists no choice \\(C\\)"),
        ([{**GOOD, "question": ""}], "non-empty string"),
    ],
)
def test_malformed_files_get_clear_errors(tmp_path, data, message):
    with pytest.raises(DatasetError, match=message):
        load_ab(write(tmp_path, data))


def test_missing_file_and_unknown_behaviour():
    with pytest.raises(DatasetError, match="not found"):
        load_ab("/nonexistent/file.json")
    with pytest.raises(DatasetError, match="available: .*tone"):
        sb.behavior("no-such-behaviour")


# ---------------------------------------------------------------------------------------
# multiple-choice accuracy sets

@pytest.mark.parametrize("name,n,golds", [("copa", 100, None), ("winogrande", 1267, None), ("boolq", 3270, (1237, 2033)),
                                          ("mmlu", 570, None)])
def test_every_accuracy_set_loads_as_one_gold_records(name, n, golds):
    items = load_mc(name)
    assert len(items) == n
    assert all(len(q.correct) == 1 and q.best == q.correct[0] and len(q.incorrect) == 1 for q in items)
    if golds is not None:  # BoolQ: gold 0 ("no") x1,237, 1 ("yes") x2,033 (SOURCE.md)
        assert (sum(q.best == "no" for q in items), sum(q.best == "yes" for q in items)) == golds
    spec = mc_set(name)
    assert spec is MC_SETS[name] and "{answer}" in spec.features


def test_winogrande_fills_the_blank_per_option_and_scores_the_shared_rest():
    rec = json.loads((sb.datasets.shared_dir() / MC_SETS["winogrande"].path).read_text().splitlines()[0])
    q = load_mc("winogrande")[0]
    (c_true, a_true, l_true), (c_false, a_false, l_false) = q.answers()
    assert (l_true, l_false) == (1, 0) and a_true == a_false == rec["continuation"]
    assert q.question + c_true == rec["context_options"][rec["gold"]]
    assert q.question + c_false == rec["context_options"][1 - rec["gold"]]


def test_limit_is_a_seeded_subset_in_file_order():
    a, b, c = load_mc("boolq", limit=50, seed=1), load_mc("boolq", limit=50, seed=1), load_mc("boolq", limit=50, seed=2)
    every = load_mc("boolq")
    assert a == b and a != c and len(a) == 50
    pos = [every.index(q) for q in a]
    assert pos == sorted(pos)
    assert load_mc("truthfulqa", limit=5) == load_mc("truthfulqa")[:5]  # TruthfulQA keeps its first questions


def test_bad_multiple_choice_files_get_clear_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"query": "a", "choices": ["b", "c"], "gold": 2}\n')
    with pytest.raises(DatasetError, match="record 1: gold 2"):
        load_mc(p)
    p.write_text('{"text": "a"}\n')
    with pytest.raises(DatasetError, match="not a multiple-choice record"):
        load_mc(p)
    p.write_text("")
    with pytest.raises(DatasetError, match="no items"):
        load_mc(p)
    with pytest.raises(DatasetError, match="not found"):
        load_mc(tmp_path / "missing.jsonl")
