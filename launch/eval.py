"""Evaluate a saved LLaVA model on a question file: answers jsonl + metrics JSON.

    python launch/eval.py model_dir=runs/finetune question_file=q.jsonl image_folder=images \
        answers_file=out/answers.jsonl ground_truth=gt.jsonl template=chatml batch_size=16
    torchrun --nproc_per_node 8 launch/eval.py ...   # each rank answers questions[rank::8]; rank 0 merges

Keys are the fields of llava_train.eval.run.EvalRunConfig (Hydra syntax, typed: a typo fails at start).
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from llava_train.config import CONF_DIR, tool_argv
from llava_train.eval.run import EvalRunConfig, register_eval_config, run_eval_config

log = logging.getLogger("launch.eval")


# The schema is registered in Hydra's ConfigStore as "llava_eval"; a conf/llava_eval.yaml would be found first.
@hydra.main(config_path=str(CONF_DIR), config_name="llava_eval", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg: EvalRunConfig = OmegaConf.to_object(raw)  # 1. typed config (MISSING keys fail here)
    log.info("1/2 evaluating %s on %s", cfg.model_dir, cfg.question_file)
    metrics = run_eval_config(cfg)  # 2. load, generate (sharded), write answers, score, write metrics
    if metrics is not None:
        log.info("2/2 overall %s -> %s", metrics["overall"], cfg.answers_file)


if __name__ == "__main__":
    register_eval_config()
    sys.argv = tool_argv(sys.argv)  # no Hydra run folder or log file: the given paths are the outputs
    main()
