"""The config tree: every YAML under conf/ composes and validates; bad input fails at load with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from train_utils import compose_config

from llava_train.config import (
    CONF_DIR,
    PRETRAINED,
    Config,
    DeepSpeedConfig,
    StageName,
    deepspeed_config_path,
    gradient_accumulation_steps,
    missing_keys,
    normalize_argv,
    to_typed,
)

GROUPS = ["stage", "model", "data", "deepspeed", "fsdp", "eval", "schedule"]


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _fill_missing(overrides: list[str]) -> list[str]:
    """Give every `???` placeholder a value (paths the user supplies on the command line)."""
    missing = missing_keys(compose_config(overrides))
    return overrides + [f"{k}=/placeholder/{k.replace('.', '_')}" for k in missing]


@pytest.fixture
def no_conversion(monkeypatch):
    # `${llava_pretrained:...}` would convert a GGUF (SmolLM2 ~20 s, Gemma 3 ~10 min); validate with stand-ins.
    monkeypatch.setitem(PRETRAINED, "smollm2_135m", lambda: "/cache/smollm2-135m-instruct")
    monkeypatch.setitem(PRETRAINED, "gemma3_270m", lambda: "/cache/gemma-3-270m")


def test_every_yaml_is_covered_by_a_group():
    found = {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")}
    listed = {"config.yaml"} | {f"{g}/{c}.yaml" for g in GROUPS for c in _choices(g)}
    assert found == listed | {"demo/pretrain.yaml"}, found ^ listed  # launch/demo.py's step 0, not a group


def test_demo_pretrain_settings_fill_their_configs():
    from llava_train.train.llm_pretrain import LlmPretrainConfig
    from llava_train.train.tower_pretrain import TowerPretrainConfig

    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "demo" / "pretrain.yaml"))
    assert set(settings) == {"tower", "llm"}
    tower, llm = TowerPretrainConfig(**settings["tower"]), LlmPretrainConfig(**settings["llm"])
    assert isinstance(tower.lr, float) and isinstance(llm.lr, float)


@pytest.mark.parametrize("group", GROUPS)
def test_every_choice_of_every_group_composes_and_validates(group, no_conversion):
    for choice in _choices(group):
        overrides = [f"{group}={choice}"] if group == "stage" else ["stage=finetune", f"{group}={choice}"]
        typed = to_typed(compose_config(_fill_missing(overrides)))
        assert isinstance(typed, Config)


def test_stage_presets_carry_llava15_hyperparameters():
    pre = to_typed(compose_config(["stage=pretrain"]))
    assert pre.stage.name == StageName.pretrain and pre.data.template == "plain"
    t = pre.training
    assert (t.learning_rate, t.global_batch_size, t.num_train_epochs, t.warmup_ratio) == (1e-3, 256, 1, 0.03)
    assert (t.lr_scheduler_type, t.weight_decay) == ("cosine", 0.0)
    ft = to_typed(
        compose_config(["stage=finetune", "stage.pretrain_mm_mlp_adapter=/p/mm_projector.safetensors"])
    )
    assert (ft.training.learning_rate, ft.training.global_batch_size) == (2e-5, 128)
    assert ft.stage.pretrain_mm_mlp_adapter == "/p/mm_projector.safetensors"
    lora = to_typed(compose_config(["stage=finetune_lora", "stage.pretrain_mm_mlp_adapter=null"]))
    assert (lora.stage.lora.r, lora.stage.lora.alpha) == (128, 256)
    assert (lora.training.learning_rate, lora.training.mm_projector_lr) == (2e-4, 2e-5)


def test_plus_stage_and_stage_are_the_same():
    a = compose_config(["+stage=pretrain"])
    b = compose_config(["stage=pretrain"])
    assert a == b


def test_normalize_argv_strips_local_rank_and_plus_on_groups():
    argv = [
        "train.py",
        "--local_rank=1",
        "+stage=finetune",
        "--local-rank",
        "0",
        "+training.foo=1",
        "model=tiny",
    ]
    assert normalize_argv(argv) == ["train.py", "stage=finetune", "+training.foo=1", "model=tiny"]


def test_no_stage_fails_with_the_fix():
    with pytest.raises(ValueError, match="stage=pretrain"):
        to_typed(compose_config([]))


def test_unknown_key_fails_at_load():
    with pytest.raises(ConfigCompositionException, match="training.lerning_rate"):
        compose_config(["stage=pretrain", "training.lerning_rate=1e-3"])
    # `+key=` makes Hydra add a key to a typed node; validation still refuses it.
    with pytest.raises(ValueError, match=r"Unknown config keys \['training.lerning_rate'\]"):
        to_typed(compose_config(["stage=pretrain", "+training.lerning_rate=1e-3"]))


def test_warmup_ratio_outside_zero_one_is_refused():
    for ratio in (1.0, 5, -0.1):
        with pytest.raises(ValueError, match="warmup_ratio"):
            to_typed(compose_config(["stage=pretrain", f"training.warmup_ratio={ratio}"]))
    assert (
        to_typed(compose_config(["stage=pretrain", "training.warmup_ratio=0.5"])).training.warmup_ratio == 0.5
    )


@pytest.mark.parametrize(
    "key", ["training.group_by_modality_length=true", "training.dataloader_num_workers=4"]
)
def test_data_settings_under_training_fail_at_load(key):
    """LLaVA's scripts pass these as training arguments; here they are data.* and must not be silently ignored."""
    with pytest.raises(ConfigCompositionException, match=key.split("=")[0]):
        compose_config(["stage=pretrain", key])


def test_unknown_key_in_a_yaml_fails_at_load(tmp_path):
    from hydra import compose, initialize_config_dir

    from llava_train.config import register_configs

    conf = tmp_path / "conf"
    for sub in CONF_DIR.rglob("*"):
        dst = conf / sub.relative_to(CONF_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if sub.is_file():
            dst.write_text(sub.read_text())
    (conf / "data" / "typo.yaml").write_text("data_path: x\nimage_folder: y\nnum_wrokers: 2\n")
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"), pytest.raises(Exception) as e:
        compose("config", overrides=["stage=pretrain", "data=typo"])
    assert "num_wrokers" in repr(e.value) + repr(e.value.__cause__)


def test_wrong_type_and_wrong_choice_fail_at_load():
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage=pretrain", "training.global_batch_size=lots"])
    assert "global_batch_size" in str(e.value) + str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(["stage=pretrain", "training.precision=bf61"])
    assert "bf16" in str(e.value.__cause__)  # the valid choices are listed
    with pytest.raises(MissingConfigException, match="finetune_lora"):
        compose_config(["stage=finetuen"])


def test_missing_placeholder_fails_with_the_key():
    with pytest.raises(ValueError, match=r"stage.pretrain_mm_mlp_adapter"):
        to_typed(compose_config(["stage=finetune"]))
    with pytest.raises(ValueError, match=r"data.data_path.*data.image_folder|data.image_folder"):
        to_typed(compose_config(["stage=pretrain", "data=llava_pretrain_558k"]))


def test_global_batch_must_divide():
    assert gradient_accumulation_steps(256, 32, 8) == 1
    assert gradient_accumulation_steps(128, 4, 2) == 16
    with pytest.raises(ValueError, match="multiple of 24"):
        gradient_accumulation_steps(128, 12, 2)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_json_files(name):
    path = Path(deepspeed_config_path(DeepSpeedConfig(name=name, config_file=f"{name}.json")))
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # the Trainer's AdamW groups + HF schedule
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_config_path(DeepSpeedConfig()) is None
    with pytest.raises(FileNotFoundError, match="nope.json"):
        deepspeed_config_path(DeepSpeedConfig(name="x", config_file="nope.json"))


def test_fsdp_on_cpu_is_refused():
    from llava_train.train.args import build_training_args

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP is allowed")
    cfg = to_typed(compose_config(["stage=pretrain", "fsdp=full_shard"]))
    with pytest.raises(RuntimeError, match="FSDP on CPU"):
        build_training_args(cfg)


def test_deepspeed_and_fsdp_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        to_typed(compose_config(["stage=pretrain", "fsdp=full_shard", "deepspeed=zero2"]))


@pytest.mark.parametrize(
    "sharding,offload",
    [("full_shard auto_wrap", False), ("shard_grad_op auto_wrap", False), ("full_shard auto_wrap offload", False),
     ("full_shard", True)],
)  # fmt: skip
def test_fsdp_config_equals_transformers_reading_of_the_legacy_string(tmp_path, sharding, offload):
    """Our fsdp_config (no deprecated string) gives the Trainer what its own translation of LLaVA's
    `--fsdp "full_shard auto_wrap"` gives (TrainingArguments construct on CPU; only training needs a GPU)."""
    from transformers import TrainingArguments

    from llava_train.config import FsdpConfig
    from llava_train.train.args import fsdp_config

    fsdp = FsdpConfig(enabled=True, sharding=sharding, cpu_offload=offload)
    ours = TrainingArguments(
        output_dir=str(tmp_path), fsdp=True, fsdp_config=fsdp_config(fsdp), report_to="none"
    )
    legacy_string = sharding + (" offload" if offload else "")
    legacy_config = {
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "activation_checkpointing": False,
    }
    legacy = TrainingArguments(
        output_dir=str(tmp_path), fsdp=legacy_string, fsdp_config=legacy_config, report_to="none"
    )
    assert ours.fsdp is True and ours.fsdp_config == legacy.fsdp_config
    with pytest.raises(ValueError, match="hybrid sharding"):
        fsdp_config(FsdpConfig(enabled=True, sharding="hybrid_shard"))


@pytest.mark.parametrize("choice", _choices("model"))
def test_every_model_yaml_builds_on_the_meta_device(choice, no_conversion):
    """Each model YAML composes into a config that builds the whole model (no weights: meta device), and the
    data side reads its geometry from that model; pretrained paths are left out (built from the preset)."""
    from llava_train.data.config import VisionSpec
    from llava_train.model.builder import PRESETS, build_model

    raw = compose_config(_fill_missing(["stage=finetune", f"model={choice}"]))
    cfg = to_typed(raw)
    cfg.model.llm_path, cfg.model.vision_tower = None, None
    with torch.device("meta"):
        model = build_model(cfg.model)
    llm, mm = PRESETS[cfg.model.preset]["llm"], PRESETS[cfg.model.preset]["mm"]
    assert model.config.hidden_size == (cfg.model.hidden_size or llm["hidden_size"])
    assert len(model.get_model().layers) == (cfg.model.num_hidden_layers or llm["num_hidden_layers"])
    spec = VisionSpec.from_model(model)
    tower = model.get_vision_tower()
    assert (spec.crop_size, spec.patches_per_side) == (tower.config.image_size, tower.num_patches_per_side)
    assert spec.image_aspect_ratio == (cfg.model.image_aspect_ratio or mm["image_aspect_ratio"])
    assert spec.model_max_length == (cfg.model.model_max_length or mm["model_max_length"])
    assert spec.mm_unpad_rounding == (cfg.model.mm_unpad_rounding or mm["mm_unpad_rounding"])
    assert all(p.is_meta for p in model.parameters())


def test_unpad_rounding_is_a_model_key_checked_at_load():
    """The v1.6 YAMLs unpad with the original's floor (their preset's), model.mm_unpad_rounding overrides it,
    and a wrong value fails at load with the choices."""
    from llava_train.model.builder import build_llava_config

    def rounding(*overrides: str) -> str:
        cfg = to_typed(compose_config(_fill_missing(["stage=finetune", *overrides])))
        return build_llava_config(cfg.model).mm_unpad_rounding

    assert rounding("model=llava_v16_vicuna7b") == "floor"
    assert rounding("model=llava_v16_vicuna7b", "model.mm_unpad_rounding=round") == "round"
    with pytest.raises(ValueError, match="mm_unpad_rounding='Floor'; use 'round'"):
        rounding("model=tiny", "model.mm_unpad_rounding=Floor")
