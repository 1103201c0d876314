"""Evaluate a saved model on a question file: load, generate (sharded under torchrun), write, score.

The model directory is a full LLaVA-Llama checkpoint (a finetune run dir, an original release) or a
transformers-native llava / llava_next export; a projector-only (stage 1) or LoRA run dir must be
merged first (launch/export.py). The tokenizer comes from the model directory unless ``tokenizer``
names one ("smollm2", "mistral", a directory).
The conversation template is required: given explicitly, or read from the ``data.template`` of the
run's resolved ``config.yaml`` next to the weights (the record of how the model was trained).

``EvalRunConfig`` is the Hydra schema of launch/eval.py; its fields are ``run_eval``'s arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING

logger = logging.getLogger(__name__)

# transformers-native checkpoints (launch/export.py output), imported back into our model class.
NATIVE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


@dataclass
class EvalRunConfig:
    """Everything launch/eval.py needs; ``???`` (MISSING) fields are mandatory on the command line."""

    model_dir: str = MISSING
    question_file: str = MISSING
    answers_file: str = MISSING
    image_folder: str | None = None
    ground_truth: str | None = None  # None: write answers only (e.g. a test-dev submission)
    template: str | None = None  # None: data.template of <model_dir>/config.yaml
    batch_size: int = 8
    max_new_tokens: int = 32
    tokenizer: str | None = None  # None: the tokenizer saved in model_dir
    metric: str = "auto"  # auto | vqa | textvqa | exact | yesno | mc | pope | mme | scienceqa
    metrics_file: str | None = None  # None: <answers_file stem>.metrics.json
    dtype: str = "float32"
    device: str | None = None  # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    model_id: str | None = None  # None: the model directory's name
    # VQAv2 test-dev upload ([{question_id, answer}], EvalAI-normalised); its ids are those of
    # submission_question_file (the whole test2015 question file for the server; None: question_file).
    submission_file: str | None = None
    submission_question_file: str | None = None
    # strict: a bad question (image path outside image_folder, missing / unreadable image) stops the run,
    # naming its question_id (answers so far are kept and resumed); skip: an empty answer, counted
    bad_record_policy: str = "strict"


def register_eval_config(name: str = "llava_eval") -> None:
    """Register ``EvalRunConfig`` with Hydra's ConfigStore as the primary config ``name``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=EvalRunConfig)


def resolve_template(model_dir: str | Path, template: str | None) -> str:
    """``template`` if given, else ``data.template`` from the run's config.yaml; fails with the fix."""
    if template:
        return template
    run_config = Path(model_dir) / "config.yaml"
    if run_config.is_file():
        from omegaconf import OmegaConf

        found = OmegaConf.select(OmegaConf.load(run_config), "data.template")
        if found:
            return str(found)
    raise ValueError(
        f"no conversation template: {run_config} has no data.template. Pass template=<name> "
        "(the one the model was trained with, e.g. chatml, vicuna_v1)."
    )


def resolve_device(device: str | None) -> torch.device:
    """The given device, or cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_eval_model(
    model_dir: str | Path, tokenizer: str | None = None, dtype: str = "float32", device: str | None = None
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of a saved LLaVA checkpoint, in eval mode on ``device``."""
    from llava_train.data import load_tokenizer
    from llava_train.model.builder import parse_dtype

    torch_dtype = parse_dtype(dtype)  # fail before anything is loaded
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass the directory of a saved full model")
    if tokenizer is None and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no tokenizer; pass tokenizer=<smollm2 | mistral | tokenizer dir> (the training one)"
        )
    tok = load_tokenizer(tokenizer or str(model_dir))
    model = _load_weights(Path(model_dir), torch_dtype)
    tower = model.get_vision_tower()
    if tower is None:
        raise ValueError(f"{model_dir} is a plain LLM (no mm_vision_tower in its config), not a LLaVA model")
    tower.load_model()  # pretrained CLIP named in the config (no-op when the checkpoint holds the tower)
    model.to(device=resolve_device(device), dtype=torch_dtype).eval()
    return model, tok, tower.image_processor()


def _load_weights(model_dir: Path, dtype: torch.dtype) -> Any:
    """Our / original LLaVA-Llama layout (strict key check), or a transformers-native llava dir."""
    from llava_train.export import import_hf, load_original

    config = json.loads((model_dir / "config.json").read_text())
    # Original releases also say model_type "llava", but keep the mm_* keys at the top level.
    if config.get("model_type") in NATIVE_MODEL_TYPES and "mm_vision_tower" not in config:
        return import_hf(model_dir, dtype)
    return load_original(model_dir, dtype)


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (nccl on CUDA, else gloo) when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def default_metrics_file(answers_file: str | Path) -> Path:
    """``answers.jsonl`` -> ``answers.metrics.json`` (same folder)."""
    path = Path(answers_file)
    return path.with_name(f"{path.stem}.metrics.json")


def run_eval(
    model_dir: str,
    question_file: str,
    image_folder: str | None,
    answers_file: str,
    ground_truth: str | None = None,
    template: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    *,
    tokenizer: str | None = None,
    metric: str = "auto",
    metrics_file: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    model_id: str | None = None,
    submission_file: str | None = None,
    submission_question_file: str | None = None,
    bad_record_policy: str = "strict",
) -> dict | None:
    """Generate answers for ``question_file``, write them, score them; returns the metrics (rank 0, else None).

    The metrics dict (also written as JSON to ``metrics_file``) has ``overall`` and ``per_category``
    (null without ``ground_truth``) and generation facts (``n_questions``, ``generation_seconds``).
    """
    from llava_train.eval.generate import dist_rank_world, generate_answers_sharded
    from llava_train.eval.metrics import score
    from llava_train.eval.questions import load_questions

    template = resolve_template(model_dir, template)
    questions = load_questions(question_file)
    model, tok, processor = load_eval_model(model_dir, tokenizer, dtype, device)
    init_distributed(model.device)
    start = time.perf_counter()
    records = generate_answers_sharded(
        model,
        tok,
        processor,
        questions,
        answers_file,
        template=template,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        image_folder=image_folder,
        model_id=model_id or Path(model_dir).resolve().name,
        bad_record_policy=bad_record_policy,
    )
    seconds = time.perf_counter() - start
    if records is None:  # not rank 0
        return None
    metrics = {"overall": None, "per_category": None}
    if ground_truth:
        metrics = score(answers_file, ground_truth, metric)
    if submission_file:
        from llava_train.eval.benchmarks import write_vqav2_submission

        write_vqav2_submission(answers_file, submission_question_file or question_file, submission_file)
        metrics["submission_file"] = str(submission_file)
    skipped = [r["question_id"] for r in records if r["metadata"].get("skipped")]
    if skipped:
        logger.warning(
            "%d bad questions skipped (empty answers, scored as wrong): %s", len(skipped), skipped[:10]
        )
    metrics.update(
        n_questions=len(questions),
        n_skipped=len(skipped),
        skipped_question_ids=skipped,
        world_size=dist_rank_world()[1],
        generation_seconds=round(seconds, 3),
        answers_file=str(answers_file),
        model_dir=str(model_dir),
        template=template,
    )
    out = Path(metrics_file) if metrics_file else default_metrics_file(answers_file)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %s and %s: %s", answers_file, out, metrics["overall"])
    return metrics


def run_eval_config(cfg: EvalRunConfig) -> dict | None:
    """``run_eval`` with the fields of an ``EvalRunConfig``."""
    return run_eval(**dataclasses.asdict(cfg))
