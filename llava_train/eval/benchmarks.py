"""Benchmark scores as the papers' tables quote them: POPE, MME, ScienceQA, and the VQAv2 submission file.

Each scorer takes the answers ``{qid: answer record}`` and ground truth ``{qid: record}`` of
``llava_train.eval.questions`` (ids already matched) and returns ``{"metric", "overall", "per_category"}``
plus its own keys. Ground-truth keys beyond ``question_id`` / ``answer``:

- pope: ``category`` (adversarial / popular / random); ``answer`` yes / no.
- mme: ``category`` (the subtask, e.g. existence), ``image`` (the two questions of an image pair up
  for acc+); ``answer`` Yes / No.
- scienceqa: ``choices`` (number of options, or the list), ``subject``, ``hint``, ``image``, ``grade``
  as in ScienceQA's problems.json; ``answer`` the letter. ``scienceqa_ground_truth`` writes them.

How each number matches the original script is stated with its function and in docs/EVALUATION.md.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from llava_train.eval.metrics import extract_choice_letter, scienceqa_choice_letter, yes_no_metrics
from llava_train.eval.normalize import normalize_textvqa_answer

POPE_KEYS = ("tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "yes_ratio")

MME_SUBTASKS = {
    "perception": (
        "existence", "count", "position", "color", "posters",
        "celebrity", "scene", "landmark", "artwork", "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}  # fmt: skip

# The columns of ScienceQA's tables (its tools/evaluate_acc.py): subject, context modality, grade.
SCIENCEQA_SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
SCIENCEQA_GRADES = {"G1-6": range(1, 7), "G7-12": range(7, 13)}
SCIENCEQA_OPTIONS = "ABCDE"


def pope_scores(answers: dict, truth: dict) -> dict:
    """eval_pope.py's numbers per category and overall, and their mean over the categories.

    ``mean`` averages each number over the categories (the "average" row of papers' POPE tables).
    """
    by_category = defaultdict(list)
    for qid, rec in truth.items():
        if rec.get("category") is None:
            raise ValueError(f"POPE ground truth {qid!r} has no 'category' (adversarial / popular / random)")
        by_category[rec["category"]].append(qid)

    def metrics(ids: list) -> dict:
        return yes_no_metrics([answers[q]["text"] for q in ids], [truth[q]["answer"] for q in ids])

    per_category = {cat: metrics(ids) for cat, ids in sorted(by_category.items())}
    mean = {k: sum(m[k] for m in per_category.values()) / len(per_category) for k in POPE_KEYS}
    return {"metric": "pope", "overall": metrics(list(truth)), "per_category": per_category, "mean": mean}


def mme_answer(text: str) -> str:
    """MME's calculation.py parse: "yes" / "no" when the lower-cased text is that, or its first four
    characters contain it ("yes" first), else "other" (counted wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(answers: dict, truth: dict) -> dict:
    """MME's calculation.py: per subtask acc, acc+ (both questions of an image right) and score
    100 * (acc + acc+); perception / cognition totals are the sums of their subtasks' scores.

    Subtasks absent from the ground truth are listed in ``missing_subtasks`` and left out of the totals
    (the original needs all 14 files).
    """
    known = {t: kind for kind, tasks in MME_SUBTASKS.items() for t in tasks}
    images = defaultdict(lambda: defaultdict(list))  # subtask -> image -> [correct?]
    for qid, rec in truth.items():
        task, image = rec.get("category"), rec.get("image")
        if task not in known or image is None:
            raise ValueError(
                f"MME ground truth {qid!r} needs 'category' (one of {sorted(known)}) and 'image', got {rec!r}"
            )
        gt = str(rec["answer"]).strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth {qid!r}: answer must be Yes or No, got {rec['answer']!r}")
        images[task][image].append(mme_answer(answers[qid]["text"]) == gt)
    per_category = {}
    for task, by_image in images.items():
        flags = [ok for oks in by_image.values() for ok in oks]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(oks) for oks in by_image.values()) / len(by_image)
        per_category[task] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * acc + 100 * acc_plus,
            "n": len(flags),
            "images": len(by_image),
        }
    totals = {
        kind: sum(per_category[t]["score"] for t in tasks if t in per_category)
        for kind, tasks in MME_SUBTASKS.items()
    }
    overall = {**totals, "total": totals["perception"] + totals["cognition"], "n": len(truth)}
    missing = [t for t in known if t not in per_category]
    return {"metric": "mme", "overall": overall, "per_category": per_category, "missing_subtasks": missing}


def scienceqa_scores(answers: dict, truth: dict) -> dict:
    """eval_science_qa.py's accuracy (its parse, options A-E, FAILED counts wrong), and the columns
    ScienceQA's evaluate_acc.py breaks it into: NAT / SOC / LAN (subject), TXT (a non-empty hint),
    IMG (an image), NO (neither), G1-6 / G7-12 (grade).

    ``overall`` also holds ``img_accuracy`` (eval_science_qa.py's IMG-Accuracy: answers whose prompt holds
    ``<image>``), ``failed`` (unparsed) and ``lenient_accuracy`` (``extract_choice_letter``'s extra forms).
    """
    correct, lenient, failed = {}, {}, 0
    for qid, rec in truth.items():
        text = answers[qid]["text"]
        n_choices = _num_choices(qid, rec)
        letter = scienceqa_choice_letter(text)
        failed += letter is None
        # The original scores a letter past the options (or past E) as wrong.
        valid = letter is not None and SCIENCEQA_OPTIONS.find(letter) in range(min(n_choices, 5))
        correct[qid] = valid and letter == _truth_letter(qid, rec)
        lenient[qid] = extract_choice_letter(text, num_options=n_choices) == _truth_letter(qid, rec)
    groups = defaultdict(list)
    for qid, rec in truth.items():
        for column in _scienceqa_columns(rec):
            groups[column].append(qid)
    multimodal = [q for q in truth if "<image>" in str(answers[q].get("prompt", ""))]
    overall = {
        "accuracy": _mean(correct.values()),
        "img_accuracy": _mean(correct[q] for q in multimodal),
        "lenient_accuracy": _mean(lenient.values()),
        "failed": failed,
        "n": len(truth),
    }
    order = [*SCIENCEQA_SUBJECTS, "TXT", "IMG", "NO", *SCIENCEQA_GRADES]
    per_category = {
        c: {"accuracy": _mean(correct[q] for q in groups[c]), "n": len(groups[c])} for c in order if groups[c]
    }
    return {"metric": "scienceqa", "overall": overall, "per_category": per_category}


def scienceqa_ground_truth(
    problems_json: str | Path, pid_splits_json: str | Path | None = None, split: str = "test"
) -> list[dict]:
    """Ground-truth records for ``metric=scienceqa`` from ScienceQA's problems.json (and pid_splits.json;
    without it, the problems whose ``split`` is ``split``)."""
    problems = json.loads(Path(problems_json).read_text())
    if pid_splits_json is not None:
        ids = json.loads(Path(pid_splits_json).read_text())[split]
    else:
        ids = [pid for pid, p in problems.items() if p.get("split") == split]
    missing = [pid for pid in ids if pid not in problems]
    if missing:
        raise ValueError(f"{problems_json} lacks problems {missing[:5]} of split {split!r}")
    return [
        {
            "question_id": pid,
            "answer": SCIENCEQA_OPTIONS[problems[pid]["answer"]],
            "choices": len(problems[pid]["choices"]),
            **{k: problems[pid].get(k) for k in ("subject", "hint", "image", "grade")},
        }
        for pid in ids
    ]


def vqav2_submission(answers: dict, question_ids: list) -> list[dict]:
    """convert_vqav2_for_submission.py's file: ``[{question_id, answer}]`` for every id in ``question_ids``
    (in that order), the answer through EvalAI's processor (``normalize_textvqa_answer``), "" where there
    is none. ``answers`` maps ``str(question_id)`` to a record with ``text``."""
    return [
        {"question_id": qid, "answer": normalize_textvqa_answer(answers[str(qid)]["text"])}
        if str(qid) in answers
        else {"question_id": qid, "answer": ""}
        for qid in question_ids
    ]


def write_vqav2_submission(
    answers_jsonl: str | Path, question_file: str | Path, path: str | Path
) -> list[dict]:
    """Write ``vqav2_submission`` of an answers jsonl over the ids of a question jsonl (for test-dev: the
    whole test2015 question file, as the server expects) to ``path`` as JSON."""
    from llava_train.eval.questions import load_answers, read_jsonl

    ids = [rec["question_id"] for rec in read_jsonl(question_file)]
    submission = vqav2_submission(load_answers(answers_jsonl), ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(submission))
    return submission


BENCHMARKS = {"pope": pope_scores, "mme": mme_scores, "scienceqa": scienceqa_scores}


def _scienceqa_columns(rec: dict) -> list[str]:
    columns = [c for c, subject in SCIENCEQA_SUBJECTS.items() if rec.get("subject") == subject]
    columns += ["TXT"] if rec.get("hint") else []
    columns += ["IMG"] if rec.get("image") else []
    columns += ["NO"] if not rec.get("hint") and not rec.get("image") else []
    grade = str(rec.get("grade") or "")
    number = int(grade[5:]) if grade.startswith("grade") and grade[5:].isdigit() else None
    return columns + [c for c, grades in SCIENCEQA_GRADES.items() if number in grades]


def _num_choices(qid: str, rec: dict) -> int:
    choices = rec.get("choices")
    if isinstance(choices, list):
        return len(choices)
    if isinstance(choices, int) and choices > 0:
        return choices
    raise ValueError(
        f"ScienceQA ground truth {qid!r} needs 'choices' (the options or their number), got {choices!r}; "
        "build it with llava_train.eval.benchmarks.scienceqa_ground_truth"
    )


def _truth_letter(qid: str, rec: dict) -> str:
    answer = rec["answer"]
    letter = SCIENCEQA_OPTIONS[answer] if isinstance(answer, int) else str(answer).strip()
    if letter not in SCIENCEQA_OPTIONS or len(letter) != 1:
        raise ValueError(f"ScienceQA ground truth {qid!r}: answer must be a letter A-E, got {answer!r}")
    return letter


def _mean(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0
