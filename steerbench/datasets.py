"""Contrastive A/B items (the CAA format) and their loaders.

An A/B item is a question whose text lists the choices ("(A) ...", "(B) ..."), the
letter of the answer that shows the behaviour and the letter that does not::

    {"question": "...\\n\\nChoices:\\n (A) Yes\\n (B) No",
     "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}

``load_ab`` reads such a JSON file (the CAA datasets in ../shared/data/caa, or the
project's own sets in data/behaviors) and validates every item; ``behavior`` finds the
project's embedded sets by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerbench.errors import DatasetError  # re-exported: steerbench.datasets.DatasetError

_CHOICE = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


def read_text(path: str | os.PathLike, what: str = "dataset file") -> str:
    """The text of ``path`` (UTF-8; a leading byte-order mark is dropped), or a
    DatasetError naming it: missing, a folder, unreadable, or not UTF-8."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{what} not found: {p}")
    if p.is_dir():
        raise DatasetError(f"{p} is a folder; give the path of a {what}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{p} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except OSError as err:
        raise DatasetError(f"{p} cannot be read ({err.strerror or err})") from None


def _read_json(p: Path):
    try:
        return json.loads(read_text(p))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{p} is not valid JSON: {err}") from None


@dataclass(frozen=True)
class ABItem:
    """One A/B question. ``choices`` maps letters to answer texts, parsed from the question."""

    question: str
    matching: str  # letter, e.g. "A"
    not_matching: str
    choices: tuple[tuple[str, str], ...]
    stem: str  # the question without its choice lines

    @property
    def matching_text(self) -> str:
        return dict(self.choices)[self.matching]

    @property
    def not_matching_text(self) -> str:
        return dict(self.choices)[self.not_matching]

    @classmethod
    def from_record(cls, record: dict, where: str = "item") -> ABItem:
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected an object, got {type(record).__name__}")
        missing = [k for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior") if k not in record]
        if missing:
            raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
        question = record["question"]
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: 'question' must be a non-empty string")
        letters = []
        for key in ("answer_matching_behavior", "answer_not_matching_behavior"):
            value = record[key]
            if isinstance(value, list) and len(value) == 1:  # some CAA files wrap the letter
                value = value[0]
            m = _LETTER.match(value) if isinstance(value, str) else None
            if m is None:
                raise DatasetError(f"{where}: {key} must be a letter such as '(A)', got {value!r}")
            letters.append(m.group(1))
        if letters[0] == letters[1]:
            raise DatasetError(f"{where}: matching and non-matching answers are both ({letters[0]})")
        lines = question.split("\n")
        choices: list[tuple[str, str]] = []
        first = None
        for i, line in enumerate(lines):
            m = _CHOICE.match(line)
            if m:
                if first is None:
                    first = i
                if any(c[0] == m.group(1) for c in choices):
                    raise DatasetError(f"{where}: the question lists choice ({m.group(1)}) twice")
                choices.append((m.group(1), m.group(2).strip()))
            elif choices and line.strip():
                # a choice's text continues on the next line
                letter, text = choices[-1]
                choices[-1] = (letter, f"{text}\n{line.strip()}")
        have = {c[0] for c in choices}
        for letter in letters:
            if letter not in have:
                raise DatasetError(f"{where}: the question lists no choice ({letter})")
        stem_lines = lines[:first]
        while stem_lines and (not stem_lines[-1].strip() or stem_lines[-1].strip().rstrip(":") == "Choices"):
            stem_lines.pop()
        stem = "\n".join(stem_lines).strip()
        if not stem:
            raise DatasetError(f"{where}: the question has no text before its choices")
        return cls(question, letters[0], letters[1], tuple(choices), stem)


def load_ab(path: str | os.PathLike, limit: int | None = None) -> list[ABItem]:
    """Read and validate a CAA-format JSON file of A/B items."""
    p = Path(path)
    records = _read_json(p)
    if not isinstance(records, list):
        raise DatasetError(f"{p}: expected a JSON list of items, got {type(records).__name__}")
    if not records:
        raise DatasetError(f"{p} has no items")
    items = [ABItem.from_record(r, f"{p.name}[{i}]") for i, r in enumerate(records)]
    return items[:limit] if limit is not None else items


def load_open_ended(path: str | os.PathLike) -> list[str]:
    """Questions of a CAA open-ended file: a JSON list of {"question": ...}."""
    p = Path(path)
    records = _read_json(p)
    if not isinstance(records, list) or not records:
        raise DatasetError(f"{p}: expected a non-empty JSON list")
    out = []
    for i, r in enumerate(records):
        q = r.get("question") if isinstance(r, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise DatasetError(f"{p.name}[{i}]: expected {{'question': <text>}}")
        out.append(q)
    return out


_SPLIT_FILES = {"train": "generate_dataset.json", "test": "test_dataset_ab.json", "open": "test_dataset_open_ended.json"}


def behaviors() -> list[str]:
    """Names of the behaviour sets embedded in the project's data/ folder."""
    folder = DATA_DIR / "behaviors"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


def shared_dir() -> Path:
    """../shared/data beside the project, or $STEERBENCH_SHARED_DATA."""
    return Path(os.environ.get("STEERBENCH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def behavior(name: str, split: str = "train", source: str = "project") -> list:
    """An A/B behaviour set by name.

    source="project": data/behaviors/<name> (embedded, always present);
    source="caa": ../shared/data/caa (train = generate/, test and open = test/).
    split: "train", "test" (held-out A/B) or "open" (open-ended questions, as strings).
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_FILES)}, got {split!r}")
    if source == "project":
        folder = DATA_DIR / "behaviors" / name
        if not folder.exists():
            raise DatasetError(f"no embedded behaviour {name!r}; available: {', '.join(behaviors())}")
    elif source == "caa":
        folder = shared_dir() / "caa" / ("generate" if split == "train" else "test") / name
        if not folder.exists():
            raise DatasetError(f"no CAA behaviour {name!r} under {folder.parent}")
    else:
        raise ValueError(f"source must be 'project' or 'caa', got {source!r}")
    path = folder / _SPLIT_FILES[split]
    return load_open_ended(path) if split == "open" else load_ab(path)


def items_hash(items: Iterable[ABItem]) -> str:
    """A short content hash of a list of items, recorded in artifacts."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.question, it.matching, it.not_matching]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# TruthfulQA-format multiple-choice questions


@dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice record: a question, its best answer, true answers and false answers.

    TruthfulQA has several of each; a one-gold set (COPA, WinoGrande, BoolQ, MMLU) has the
    gold choice as its one true (and best) answer and the others as false ones.
    ``contexts`` (optional, one per answer in ``correct + incorrect`` order) is text that
    goes between the question and that answer: WinoGrande's sentence with its blank filled
    in by that option, after which the shared rest of the sentence is scored.
    """

    question: str
    best: str
    correct: tuple[str, ...]  # true answers (the best one included)
    incorrect: tuple[str, ...]
    category: str = ""
    contexts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.contexts and len(self.contexts) != len(self.correct) + len(self.incorrect):
            raise DatasetError(f"{len(self.contexts)} contexts for {len(self.correct) + len(self.incorrect)} answers")
        n = len(self.correct)
        ctx = self.contexts or ("",) * (n + len(self.incorrect))  # WinoGrande: one continuation, several contexts
        both = set(zip(ctx[:n], self.correct)) & set(zip(ctx[n:], self.incorrect))
        if both:
            raise DatasetError(f"question {self.question[:60]!r}: answer(s) {sorted(a for _, a in both)} are listed "
                               "both true and false")
        if not self.correct or not self.incorrect:
            raise DatasetError(f"question {self.question[:60]!r} needs at least one true and one false answer")

    def answers(self) -> list[tuple[str, str, int]]:
        """(text before the answer after the question, answer, label 1 = true) for every
        answer, true ones first: what scoring and feature reading iterate over."""
        rows = [(a, 1) for a in self.correct] + [(a, 0) for a in self.incorrect]
        ctx = self.contexts or ("",) * len(rows)
        return [(c, a, label) for c, (a, label) in zip(ctx, rows)]


def _split_answers(cell: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a.strip() for a in cell.split(";") if a.strip()))


def load_truthfulqa(path: str | os.PathLike | None = None, limit: int | None = None) -> list[MCQuestion]:
    """Questions from a TruthfulQA-format CSV.

    path=None reads TruthfulQA itself from ../shared/data/truthfulqa/TruthfulQA.csv;
    ``"misconceptions"`` reads the project's embedded set (data/truthfulness).
    """
    import csv

    if path is None:
        p = shared_dir() / "truthfulqa" / "TruthfulQA.csv"
    elif str(path) == "misconceptions":
        p = DATA_DIR / "truthfulness" / "misconceptions.csv"
    else:
        p = Path(path)
    text = read_text(p)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    need = {"Question", "Best Answer", "Correct Answers", "Incorrect Answers"}
    missing = need - set(reader.fieldnames or ())
    if missing:
        raise DatasetError(f"{p.name}: missing column(s) {', '.join(sorted(missing))}")
    out, dropped = [], []
    try:
        rows = list(reader)
    except csv.Error as err:
        raise DatasetError(f"{p.name}: not a readable CSV ({err})") from None
    for i, row in enumerate(rows):
        short = [k for k in need if row.get(k) is None]
        if short:
            raise DatasetError(f"{p.name} row {i + 2}: too few cells (no {', '.join(sorted(short))})")
        best = row["Best Answer"].strip()
        correct = _split_answers(row["Correct Answers"])
        if best and best not in correct:
            correct = (best, *correct)
        incorrect = _split_answers(row["Incorrect Answers"])
        both = set(correct) & set(incorrect)
        if both and best not in both:
            # TruthfulQA itself lists "Unknown" as true and false for two questions (rows 349,
            # 356): such an answer says nothing, so it is dropped from both lists
            dropped.append(i + 2)
            correct = tuple(a for a in correct if a not in both)
            incorrect = tuple(a for a in incorrect if a not in both)
        if not row["Question"].strip() or not best or not incorrect:
            raise DatasetError(f"{p.name} row {i + 2}: a question needs text, a best answer and false answers")
        out.append(MCQuestion(row["Question"].strip(), best, correct, incorrect, (row.get("Category") or "").strip()))
    if dropped:
        warnings.warn(f"{p.name}: answers listed both true and false were dropped from both lists in row(s) "
                      f"{', '.join(map(str, dropped))}", stacklevel=2)
    if not out:
        raise DatasetError(f"{p} has no questions")
    return out[:limit] if limit is not None else out


def qa_examples(
    questions: Sequence[MCQuestion], template: str = "Q: {question} A: {answer}"
) -> tuple[list[str], list[int], list[int]]:
    """One text per (question, answer): texts, labels (1 = true answer) and groups (question index).

    The format ITI, FASB and REAL read head activations from (at the last token).
    """
    texts, labels, groups = [], [], []
    for g, q in enumerate(questions):
        for ctx, a, label in q.answers():
            texts.append(template.format(question=q.question + ctx, answer=a))
            labels.append(label)
            groups.append(g)
    return texts, labels, groups


# ---------------------------------------------------------------------------------------
# multiple-choice accuracy sets (../shared/data/mc, MMLU as A/B), as MCQuestion records


@dataclass(frozen=True)
class MCSet:
    """A multiple-choice dataset steerbench knows by name, and its zero-shot prompt.

    ``prompt`` names a template in ``truthfulqa.PROMPTS`` (``{question}`` is the record's
    question, followed by the scored answer after a space); ``features`` is the text at
    whose last token methods read activations (ITI, SADI)."""

    name: str
    path: str  # under ../shared/data
    prompt: str
    features: str
    about: str


MC_SETS = {
    "truthfulqa": MCSet("truthfulqa", "truthfulqa/TruthfulQA.csv", "instruction+primer", "Q: {question} A: {answer}",
                        "TruthfulQA, 817 questions; MC1/MC2/MC3"),
    "copa": MCSet("copa", "mc/copa/copa_val.jsonl", "copa", "{question} {answer}",
                  "COPA validation, 100 items: premise + 'because'/'therefore', two alternatives"),
    "winogrande": MCSet("winogrande", "mc/winogrande/winogrande_dev.jsonl", "winogrande", "{question} {answer}",
                        "WinoGrande dev, 1,267 items: the blank filled by each option, the rest of the sentence scored"),
    "boolq": MCSet("boolq", "mc/boolq/boolq_val.jsonl", "boolq", "{question}\nAnswer: {answer}",
                   "BoolQ dev, 3,270 items: passage and question, answer no / yes"),
    "mmlu": MCSet("mmlu", "caa/test/mmlu/mmlu.json", "mmlu", "{question}\nAnswer: {answer}",
                  "MMLU as A/B, 570 items: question with two choices, answer (A) / (B)"),
    # the embedded behaviour sets (data/behaviors), their A/B items read as two answers to
    # the question stem in the model's chat format, the matching one true
    "tone": MCSet("tone", "", "chat", "{question} {answer}",
                  "tone (embedded), 85 items: a chat request, the warm answer against the discouraging one"),
    "refusal": MCSet("refusal", "", "chat", "{question} {answer}",
                     "refusal (embedded), 85 items: a chat request, the refusal against the compliance"),
}


def _one_gold(question: str, choices: Sequence[str], gold: int, contexts: Sequence[str] = ()) -> MCQuestion:
    if not 0 <= gold < len(choices):
        raise DatasetError(f"gold {gold} is not an index of {len(choices)} choices")
    others = [k for k in range(len(choices)) if k != gold]
    ctx = tuple(contexts[k] for k in [gold, *others]) if contexts else ()
    return MCQuestion(question, choices[gold], (choices[gold],), tuple(choices[k] for k in others), contexts=ctx)


def _mc_record(rec: dict, where: str) -> MCQuestion:
    try:
        if "context_options" in rec:  # WinoGrande (partial scoring): the shared rest of the sentence is scored
            options = [str(o) for o in rec["context_options"]]
            cut = os.path.commonprefix(options)
            cut = cut[: cut.rfind(" ") + 1] if " " in cut else ""
            cont = str(rec["continuation"]).strip()
            return _one_gold(cut, [cont] * len(options), int(rec["gold"]), [o[len(cut):] for o in options])
        if "query" in rec:  # COPA, BoolQ (llm-foundry format)
            return _one_gold(str(rec["query"]).strip(), [str(c).strip() for c in rec["choices"]], int(rec["gold"]))
        if "prompt" in rec:  # MMLU as A/B (CAA format)
            return MCQuestion(str(rec["prompt"]).strip(), str(rec["correct"]).strip(), (str(rec["correct"]).strip(),),
                              (str(rec["incorrect"]).strip(),), category=str(rec.get("category", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: {e}") from None
    raise DatasetError(f"{where}: not a multiple-choice record (expected query/choices/gold, "
                       "context_options/continuation/gold or prompt/correct/incorrect)")


def load_mc(name: str | os.PathLike = "truthfulqa", limit: int | None = None, seed: int = 42) -> list[MCQuestion]:
    """A multiple-choice set by name (``MC_SETS``: truthfulqa, copa, winogrande, boolq, mmlu;
    ``misconceptions``: the embedded TruthfulQA-format set) or path (a TruthfulQA-format
    CSV, or JSON / JSON-lines records in the formats of ../shared/data/mc and MMLU).

    ``limit``: TruthfulQA-format CSVs keep their first ``limit`` questions (as before);
    the other sets a seeded random subset of ``limit`` items, in file order.
    """
    key = str(name)
    if key == "misconceptions" or key == "truthfulqa" or key.endswith(".csv"):
        return load_truthfulqa(None if key == "truthfulqa" else key, limit=limit)
    if key in MC_SETS and not MC_SETS[key].path:  # an embedded behaviour: its train and held-out A/B items
        items = behavior(key, "train") + behavior(key, "test")
        out = [MCQuestion(it.stem, it.matching_text, (it.matching_text,), (it.not_matching_text,), category=key)
               for it in items]
        return _subset(out, limit, seed)
    p = shared_dir() / MC_SETS[key].path if key in MC_SETS else Path(key)
    if not p.exists():
        raise DatasetError(f"dataset file not found: {p} (known sets: {', '.join(MC_SETS)}, misconceptions)")
    text = read_text(p)
    try:
        records = json.loads(text) if p.suffix == ".json" else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p.name}: not valid JSON ({e})") from None
    out = [_mc_record(r, f"{p.name} record {i + 1}") for i, r in enumerate(records)]
    if not out:
        raise DatasetError(f"{p} has no items")
    return _subset(out, limit, seed)


def _subset(out: list[MCQuestion], limit: int | None, seed: int) -> list[MCQuestion]:
    if limit is not None and limit < len(out):
        import numpy as np

        keep = sorted(np.random.default_rng(seed).choice(len(out), size=limit, replace=False).tolist())
        out = [out[i] for i in keep]
    return out


def mc_set(name: str | os.PathLike) -> MCSet:
    """The set's prompt and feature templates (TruthfulQA's for TruthfulQA-format CSVs and
    unknown files, with the plain zero-shot templates for JSON records)."""
    key = str(name)
    if key in MC_SETS:
        return MC_SETS[key]
    if key == "misconceptions" or key.endswith(".csv"):
        return dataclasses.replace(MC_SETS["truthfulqa"], name=Path(key).stem, path=key)
    return MCSet(Path(key).stem, key, "copa", "{question} {answer}", f"multiple-choice records from {key}")


def neutral_texts(path: str | os.PathLike | None = None) -> list[str]:
    """Paragraphs of neutral text (default: data/neutral/paragraphs.txt), for measuring how far
    an intervention moves the model off-task (``evaluation.kl_to_unsteered``)."""
    p = Path(path) if path is not None else DATA_DIR / "neutral" / "paragraphs.txt"
    lines = [ln for ln in read_text(p).splitlines() if not ln.startswith("#")]
    paras = [" ".join(block.split()) for block in "\n".join(lines).split("\n\n")]
    out = [t for t in paras if t]
    if not out:
        raise DatasetError(f"{p} has no paragraphs")
    return out
