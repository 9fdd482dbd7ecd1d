import json

import pytest

import steerbench as sb
from steerbench.datasets import DatasetError, load_ab


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
