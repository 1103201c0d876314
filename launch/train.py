"""Train a LLaVA model: one stage (pretrain / finetune / finetune_lora) of the config tree in conf/.

    python launch/train.py stage=pretrain                                 # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 2 launch/train.py stage=finetune deepspeed=zero2 ...
    deepspeed launch/train.py +stage=finetune model=llava_v15_vicuna7b data=llava_mix665k \
        stage.pretrain_mm_mlp_adapter=runs/pretrain/mm_projector.safetensors deepspeed=zero3

Every step is a library call (llava_train/train/steps.py); this file only orders them.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from llava_train.config import CONF_DIR, normalize_argv, register_configs, to_typed
from llava_train.train import steps
from llava_train.train.stages import apply_stage

log = logging.getLogger("launch.train")


def train(raw: DictConfig) -> None:
    cfg = to_typed(raw)  # 0. typed + validated (fails here, with the fix, on a bad value)
    run_dir = steps.setup_run(cfg, raw)  # 1. seed, run dir, config.yaml
    log.info("1/8 run dir %s", run_dir)
    tokenizer = steps.build_tokenizer(cfg)  # 2. tokenizer
    log.info("2/8 tokenizer %s (%d tokens)", cfg.tokenizer, len(tokenizer))
    model = steps.build_model(cfg, tokenizer)  # 3. LLM + vision tower + projector
    log.info("3/8 model %s", cfg.model.preset)
    model = apply_stage(model, cfg.stage)  # 4. freeze / unfreeze / LoRA, logged per component
    log.info("4/8 stage %s applied", cfg.stage.name.value)
    dataset, collator = steps.build_data(cfg, tokenizer, model)  # 5. dataset + collator
    log.info("5/8 data: %d records", len(dataset))
    trainer = steps.build_trainer(cfg, model, tokenizer, dataset, collator)  # 6. trainer
    log.info("6/8 trainer: gradient accumulation %d", trainer.args.gradient_accumulation_steps)
    steps.train(trainer, cfg)  # 7. train (resume from the latest complete checkpoint if asked)
    log.info("7/8 trained %d steps", trainer.state.global_step)
    steps.save_final(trainer, cfg)  # 8. stage weights + loss curve into the run dir
    log.info("8/8 saved to %s", run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(raw: DictConfig) -> None:
    train(raw)


if __name__ == "__main__":
    register_configs()
    sys.argv = normalize_argv(sys.argv)  # deepspeed's --local_rank=N; `+stage=x` == `stage=x`
    main()
