"""Answer scoring: VQA / TextVQA soft accuracy, exact match, POPE yes/no metrics, multiple-choice letters.

Every scorer takes predicted strings and ground-truth answers and returns plain floats in [0, 1],
so the numbers can be written to a metrics JSON as they are. ``score`` reads the answers and
ground-truth jsonl files (formats in ``llava_train.eval.questions``), picks the metric, and returns
``{"metric", "overall", "per_category"}``; the benchmark metrics (pope, mme, scienceqa) are computed in
``llava_train.eval.benchmarks`` and add their own keys (docs/EVALUATION.md).

Deviation from the official VQA script, on purpose: it normalises the prediction and the human
answers only when the humans disagree; here both are always normalised, which is what LLaVA's
submission pipeline (normalise predictions, then the server's script) amounts to.
"""

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from llava_train.eval.normalize import normalize_textvqa_answer, normalize_vqa_answer

METRICS = ("auto", "vqa", "textvqa", "exact", "yesno", "mc", "pope", "mme", "scienceqa")

# Number of humans that must agree with a prediction for full credit in VQA accuracy.
_VQA_AGREEMENT = 3.0


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer are equal after VQA normalisation, else 0.0."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 soft accuracy of one prediction against the human answers.

    For each of the n leave-one-out subsets of the n human answers, the accuracy is
    min(1, #matches in the subset / 3); the result is the mean over the subsets. With a single
    answer (a str, or a list of one) it is plain exact match after normalisation.
    """
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer, got an empty list")
    if len(answers) == 1:
        return exact_match(prediction, answers[0])
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(matches)
    # Leaving answer i out removes its own match from the count.
    subset_accs = [min(1.0, (total - m) / _VQA_AGREEMENT) for m in matches]
    return sum(subset_accs) / len(subset_accs)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA soft accuracy as LLaVA's eval_textvqa.py (m4c ``TextVQAAccuracyEvaluator``) computes it.

    Prediction and human answers go through ``normalize_textvqa_answer`` (EvalAI's processor); the score
    is the mean over the leave-one-out subsets of min(1, #matches / 3). TextVQA has 10 answers per
    question (the original asserts it); any number from 2 up is accepted here.
    """
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError(
            f"textvqa_accuracy needs the list of human answers (10 in TextVQA), got {answers!r}; "
            "use metric='exact' for a single reference answer"
        )
    pred = normalize_textvqa_answer(prediction)
    matches = [normalize_textvqa_answer(a) == pred for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / _VQA_AGREEMENT) for m in matches) / len(matches)


def yes_no(text: str) -> str:
    """Map a free-form answer to "yes" or "no" as POPE's evaluation does.

    Keep the first sentence (up to the first "."), drop commas, split on spaces; the answer is "no"
    when one of the words is exactly "No", "no" or "not", otherwise "yes".
    """
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def yes_no_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class: tp / fp / tn / fn, accuracy, precision, recall, f1,
    yes_ratio (eval_pope.py's numbers).

    Ground-truth answers must be "yes" or "no" (any case); predictions are mapped with ``yes_no``.
    Precision / recall / f1 with a zero denominator are reported as 0.0 (the original raises).
    """
    _check_same_length(predictions, answers)
    labels = [_yes_no_label(a) for a in answers]
    preds = [yes_no(p) == "yes" for p in predictions]
    tp = sum(p and t for p, t in zip(preds, labels))
    fp = sum(p and not t for p, t in zip(preds, labels))
    fn = sum(not p and t for p, t in zip(preds, labels))
    tn = len(preds) - tp - fp - fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _ratio(tp + tn, len(preds)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(sum(preds), len(preds)),
        "n": len(preds),
    }


# eval_science_qa.py's rules, in its order: the whole text is a letter A-E; the text starts with
# "X. "; exactly one "The answer is X" followed by any character. Its options are A-E only.
_STRICT_OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")

# Forms the original does not parse, tried only where it fails; each captures the letter in group 1.
_LENIENT_PATTERNS = [
    re.compile(r"^\(?([A-Z])\)?[.:]?$"),  # "A", "(A)", "A.", "A)"
    re.compile(r"^\(?([A-Z])[.:)]\s"),  # "A. cat", "(A) cat", "A) cat", "A: cat"
    re.compile(r"(?i:answer is):?\s*\(?([A-Z])\b"),  # "the answer is A", "answer is (B)", two answers
    re.compile(r"^(?i:answer):\s*\(?([A-Z])\b"),  # "Answer: C"
]


def scienceqa_choice_letter(text: str) -> str | None:
    """The letter eval_science_qa.py parses from a prediction, or None where it reports FAILED."""
    if text in _STRICT_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in _STRICT_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def extract_choice_letter(text: str, num_options: int | None = None, strict: bool = False) -> str | None:
    """Extract the option letter of a multiple-choice answer, or None when there is none.

    First eval_science_qa.py's rules (``scienceqa_choice_letter``), so "(B) cat. The answer is A." is A
    as there. Unless ``strict``, where they fail: "(A)", "A.", "A)", "(A) cat", "A) cat", "A: cat",
    "the answer is (A)", "Answer: A" (on the stripped text). Only upper-case letters count (a lower-case
    "a" is an article). With ``num_options``, letters past the last option are rejected.
    """
    letter = scienceqa_choice_letter(text)
    if letter is None and not strict:
        stripped = text.strip()
        found = next((m for m in (p.search(stripped) for p in _LENIENT_PATTERNS) if m is not None), None)
        letter = found.group(1) if found is not None else None
    if letter is not None and num_options is not None and ord(letter) - ord("A") >= num_options:
        return None
    return letter


def choice_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Multiple-choice accuracy: extracted letter == ground-truth letter; unparsed answers are wrong."""
    _check_same_length(predictions, answers)
    letters = [extract_choice_letter(p) for p in predictions]
    truth = [_ground_truth_letter(a) for a in answers]
    return {
        "accuracy": _ratio(sum(p == t for p, t in zip(letters, truth)), len(truth)),
        "unparsed": sum(p is None for p in letters),
        "n": len(truth),
    }


def mean_accuracy(predictions: Sequence[str], answers: Sequence, metric: str) -> dict[str, float]:
    """Mean of the per-question "vqa" / "textvqa" (soft accuracy) or "exact" scores."""
    _check_same_length(predictions, answers)
    if metric == "vqa":
        scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    elif metric == "textvqa":
        scores = [textvqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    elif metric == "exact":
        scores = [exact_match(p, _single_answer(a)) for p, a in zip(predictions, answers)]
    else:
        raise ValueError(f"mean_accuracy handles 'vqa', 'textvqa' and 'exact', not {metric!r}")
    return {"accuracy": _ratio(sum(scores), len(scores)), "n": len(scores)}


def compute_metrics(predictions: Sequence[str], answers: Sequence, metric: str) -> dict[str, float]:
    """Dispatch to the scorer of ``metric`` ("vqa", "textvqa", "exact", "yesno", "mc")."""
    if metric in ("vqa", "textvqa", "exact"):
        return mean_accuracy(predictions, answers, metric)
    if metric == "yesno":
        return yes_no_metrics(predictions, answers)
    if metric == "mc":
        return choice_accuracy(predictions, answers)
    raise ValueError(f"unknown metric {metric!r}; per question: vqa, textvqa, exact, yesno or mc")


def detect_metric(answers: Sequence) -> str:
    """Pick a metric from the ground truth: all yes/no -> "yesno", all single letters -> "mc", else "vqa"."""
    flat = [a if isinstance(a, str) else None for a in answers]
    if all(a is not None and a.strip().lower() in ("yes", "no") for a in flat):
        return "yesno"
    if all(a is not None and re.fullmatch(r"[A-Z]", a.strip()) for a in flat):
        return "mc"
    return "vqa"


def score_records(
    predictions: dict, ground_truth: dict, categories: dict | None = None, metric: str = "auto"
) -> dict:
    """Score predictions {qid: text} against ground truth {qid: answer}, overall and per category.

    ``categories`` maps qid -> category name (missing or None: no breakdown for that question).
    Every ground-truth question must have a prediction and vice versa.
    """
    _check_same_ids(predictions, ground_truth)
    ids = list(ground_truth)
    if metric == "auto":
        metric = detect_metric([ground_truth[q] for q in ids])
    result = {"metric": metric, "overall": _metrics_for(ids, predictions, ground_truth, metric)}
    by_category = defaultdict(list)
    for qid in ids:
        category = (categories or {}).get(qid)
        if category is not None:
            by_category[category].append(qid)
    result["per_category"] = {
        cat: _metrics_for(qids, predictions, ground_truth, metric)
        for cat, qids in sorted(by_category.items())
    }
    return result


def score(answers_jsonl: str | Path, ground_truth_jsonl: str | Path, metric: str = "auto") -> dict:
    """Score an answers jsonl against a ground-truth jsonl; returns ``metric``, ``overall``, ``per_category``.

    pope / mme / scienceqa read the extra ground-truth keys of their benchmark (docs/EVALUATION.md).
    """
    from llava_train.eval.questions import load_answers, load_ground_truth

    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    records = load_answers(answers_jsonl)
    predictions = {qid: rec["text"] for qid, rec in records.items()}
    truth = load_ground_truth(ground_truth_jsonl)
    if metric in ("pope", "mme", "scienceqa"):
        from llava_train.eval import benchmarks

        _check_same_ids(predictions, truth)
        return benchmarks.BENCHMARKS[metric](records, truth)
    answers = {qid: rec["answer"] for qid, rec in truth.items()}
    categories = {qid: rec.get("category") for qid, rec in truth.items()}
    return score_records(predictions, answers, categories, metric)


def _metrics_for(ids: list, predictions: dict, ground_truth: dict, metric: str) -> dict:
    return compute_metrics([predictions[q] for q in ids], [ground_truth[q] for q in ids], metric)


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def _check_same_length(predictions: Sequence, answers: Sequence) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} ground-truth answers")


def _check_same_ids(predictions: dict, ground_truth: dict) -> None:
    missing = [q for q in ground_truth if q not in predictions]
    extra = [q for q in predictions if q not in ground_truth]
    if missing or extra:
        raise ValueError(
            f"answers and ground truth disagree: {len(missing)} ground-truth questions have no answer "
            f"(e.g. {missing[:5]}), {len(extra)} answers have no ground truth (e.g. {extra[:5]}). "
            "Regenerate the answers from the question file that matches this ground truth."
        )


def _single_answer(answer) -> str:
    if isinstance(answer, str):
        return answer
    if len(answer) != 1:
        raise ValueError(f"exact match needs one ground-truth answer, got {answer!r}; use metric='vqa'")
    return answer[0]


def _yes_no_label(answer) -> bool:
    value = _single_answer(answer).strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"yes/no ground truth must be 'yes' or 'no', got {answer!r}")
    return value == "yes"


def _ground_truth_letter(answer) -> str:
    letter = extract_choice_letter(_single_answer(answer))
    if letter is None:
        raise ValueError(f"multiple-choice ground truth must be an option letter like 'A', got {answer!r}")
    return letter
