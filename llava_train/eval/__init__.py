"""Evaluation: question / answer files, answer normalisation, scores, batched generation.

``llava_train.eval.generate`` (batched generation, torchrun sharding) and ``llava_train.eval.run``
(``run_eval``: load a saved model, generate, write, score) need torch and the model / data packages;
import them on their own so that scoring stays light.
"""

from llava_train.eval.metrics import score, score_records, textvqa_accuracy, vqa_accuracy, yes_no_metrics
from llava_train.eval.normalize import normalize_vqa_answer
from llava_train.eval.questions import Question, load_answers, load_ground_truth, load_questions

__all__ = [
    "Question",
    "load_answers",
    "load_ground_truth",
    "load_questions",
    "normalize_vqa_answer",
    "score",
    "score_records",
    "textvqa_accuracy",
    "vqa_accuracy",
    "yes_no_metrics",
]
