"""Evaluation file formats: LLaVA question jsonl in, answers jsonl out, ground-truth jsonl.

- questions: one JSON object per line with ``question_id``, ``image`` (path relative to an image
  folder; may be absent or null for a text-only question), ``text`` (the prompt, without the image
  token), optional ``category``.
- answers (LLaVA's ``model_vqa`` output): ``question_id``, ``prompt``, ``text`` (the generated
  answer), ``answer_id`` (random hex), ``model_id``, ``metadata`` (a dict).
- ground truth: ``question_id``, ``answer`` (a str, or a list of human answers for VQA soft
  accuracy), optional ``category``.

Question ids are matched across files by ``str(question_id)`` so that ``1`` and ``"1"`` agree.
"""

import json
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    """One evaluation question; ``image`` is None for text-only questions."""

    question_id: int | str
    text: str
    image: str | None = None
    category: str | None = None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a jsonl file (blank lines skipped); errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write records as jsonl, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def load_questions(path: str | Path) -> list[Question]:
    """Load a LLaVA question jsonl, checking the required keys and unique ids."""
    questions = []
    for i, rec in enumerate(read_jsonl(path), start=1):
        _require_keys(rec, ("question_id", "text"), path, i)
        questions.append(Question(rec["question_id"], rec["text"], rec.get("image"), rec.get("category")))
    _require_unique([q.question_id for q in questions], path)
    return questions


def make_answer_record(
    question: Question, prompt: str, text: str, model_id: str, metadata: dict | None = None
) -> dict:
    """One answers-jsonl record in the original LLaVA format."""
    return {
        "question_id": question.question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex[:22],
        "model_id": model_id,
        "metadata": dict(metadata or {}),
    }


def load_answers(path: str | Path) -> dict[str, dict]:
    """Load an answers jsonl as {str(question_id): record}."""
    records = read_jsonl(path)
    for i, rec in enumerate(records, start=1):
        _require_keys(rec, ("question_id", "text"), path, i)
    _require_unique([r["question_id"] for r in records], path)
    return {str(r["question_id"]): r for r in records}


def load_ground_truth(path: str | Path) -> dict[str, dict]:
    """Load a ground-truth jsonl as {str(question_id): record}; ``answer`` is a str or a non-empty list."""
    records = read_jsonl(path)
    for i, rec in enumerate(records, start=1):
        _require_keys(rec, ("question_id", "answer"), path, i)
        answer = rec["answer"]
        if not isinstance(answer, str) and not (isinstance(answer, list) and answer):
            raise ValueError(f"{path}:{i}: 'answer' must be a string or a non-empty list, got {answer!r}")
    _require_unique([r["question_id"] for r in records], path)
    return {str(r["question_id"]): r for r in records}


def _require_keys(rec: dict, keys: tuple[str, ...], path: str | Path, line_no: int) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{path}: record {line_no} lacks {missing}; it has {sorted(rec)}")


def _require_unique(ids: list, path: str | Path) -> None:
    seen, dupes = set(), []
    for qid in ids:
        key = str(qid)
        if key in seen:
            dupes.append(qid)
        seen.add(key)
    if dupes:
        raise ValueError(f"{path}: duplicate question_id values {dupes[:5]}; ids must be unique per file")
