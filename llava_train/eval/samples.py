"""A picture of an evaluation: held-out images with the question, the model's answer and the truth.

    plot_samples("q.jsonl", "answers.jsonl", "truth.jsonl", "images/", "samples.png")

One panel per question, picked round-robin over the categories so that every question type shows;
a right answer is titled in green, a wrong one in red (scored as ``vqa_accuracy`` scores it).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from llava_train.eval.metrics import vqa_accuracy
from llava_train.eval.questions import Question, load_answers, load_ground_truth, load_questions

_FIRST_LINE = 38  # characters of a question shown above its image


def pick_round_robin(questions: list[Question], n: int) -> list[Question]:
    """Up to ``n`` questions, one per category in turn (categories in first-seen order)."""
    by_category: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_category[str(question.category)].append(question)
    queues = list(by_category.values())
    picked: list[Question] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def plot_samples(
    question_file: str | os.PathLike,
    answers_file: str | os.PathLike,
    ground_truth: str | os.PathLike,
    image_folder: str | os.PathLike,
    path: str | os.PathLike,
    n: int = 16,
) -> Path:
    """Write a grid of ``n`` held-out questions as a PNG at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    answers, truth = load_answers(answers_file), load_ground_truth(ground_truth)
    picked = pick_round_robin([q for q in load_questions(question_file) if str(q.question_id) in answers], n)
    if not picked:
        raise ValueError(f"no question of {question_file} has an answer in {answers_file}")
    cols = min(4, len(picked))
    rows = math.ceil(len(picked) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    right = 0
    for ax, question in zip(axes.flat, picked):
        qid = str(question.question_id)
        said, expected = answers[qid]["text"].strip(), truth[qid]["answer"]
        ok = vqa_accuracy(said, expected) == 1.0
        right += ok
        with Image.open(Path(image_folder) / question.image) as image:
            ax.imshow(image.convert("RGB"))
        text = question.text.splitlines()[0][:_FIRST_LINE]
        shown = said[:20].encode("ascii", "replace").decode()  # the plot font has no CJK glyphs
        ax.set_title(
            f"{text}\n{'✓' if ok else '✗'} model: {shown!r}  truth: {expected!r}",
            fontsize=8,
            color="tab:green" if ok else "tab:red",
        )
    fig.suptitle(f"held-out questions: {right} of {len(picked)} right (green ✓), wrong in red ✗", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
