"""The LLaVA-OneVision side of the native conversion: ``anyres_max_N`` + spatial_unpad <-> LlavaOnevision.

Laid out as llava-hf/llava-onevision-qwen2-7b-ov-hf (transformers' convert_llava_onevision_weights_to_hf):
the tower as we run it (SigLIP: the last encoder layer and the head already removed, so the native
``vision_feature_layer`` is -1 where our config records LLaVA-NeXT's -2), ``vision_feature_select_strategy``
"full" for a tower without CLS ("default" drops CLIP's), ``vision_aspect_ratio`` = our
``image_aspect_ratio``, grid pinpoints expanded and in (h, w), and ``LlavaOnevisionImageProcessor`` with
the tower's own mean / std and a plain S x S bicubic resize of the whole image (no centre crop).

The merge is the same computation in the three codes (LLaVA-NeXT ``llava_arch.py``, transformers'
``pack_image_features``, our ``merge_image_crops``): unpad the grid's feature map, bilinearly downscale it
when it holds more than 1.1^2 x N crops' worth of tokens, then a newline column, then the base crop first.
The state-dict keys are those of LlavaNext (``hf_native._TO_NATIVE``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.model.anyres import anyres_max_patches, parse_grid_pinpoints

logger = logging.getLogger(__name__)


def _swap(pinpoints: list) -> list[list[int]]:
    return [[int(b), int(a)] for a, b in pinpoints]


def _is_siglip(tower: Any) -> bool:
    return tower.config.model_type in ("siglip_vision_model", "siglip")


def feature_select(model: Any) -> tuple[int, str]:
    """(vision_feature_layer, vision_feature_select_strategy) of the native model for our tower."""
    tower, config = model.get_vision_tower(), model.config
    if _is_siglip(tower):
        return -1, "full"  # our SigLIP tower already ends at the layer LLaVA-NeXT selects
    return config.mm_vision_select_layer, "default" if config.mm_vision_select_feature == "patch" else "full"


def onevision_config(model: Any, common: dict[str, Any]) -> Any:
    """transformers' LlavaOnevisionConfig from the fields shared with Llava / LlavaNext (``common``)."""
    from transformers import LlavaOnevisionConfig

    layer, strategy = feature_select(model)
    tower = model.get_vision_tower()
    pinpoints = parse_grid_pinpoints(model.config.image_grid_pinpoints, tower.image_size)
    fields = {k: v for k, v in common.items() if k != "image_seq_length"}
    fields.update(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    return LlavaOnevisionConfig(
        **fields,
        # no <video> token is added: one id past the image token, outside the vocab, is never matched
        video_token_index=common["image_token_index"] + 1,
        image_grid_pinpoints=_swap(pinpoints),
        vision_aspect_ratio=model.config.image_aspect_ratio,
    )


def onevision_image_processor(model: Any) -> Any:
    """LlavaOnevisionImageProcessorPil giving the pixels of our ``process_anyres_image``."""
    from transformers import LlavaOnevisionImageProcessorPil

    tower = model.get_vision_tower()
    ours, side = tower.image_processor(), tower.image_size
    pinpoints = _swap(parse_grid_pinpoints(model.config.image_grid_pinpoints, side))
    return LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side},
        image_mean=list(ours.image_mean),
        image_std=list(ours.image_std),
        resample=3,  # bicubic, as PIL's default resize in our pipeline
        image_grid_pinpoints=pinpoints,
        do_center_crop=False,
        do_pad=True,  # pads the crop dimension across a batch only
    )


def onevision_video_processor(model: Any) -> Any:
    """LlavaOnevisionVideoProcessor with the image processor's size and mean / std (needs torchvision).

    Our model takes no video; the processor object cannot be built without one.
    """
    from transformers import LlavaOnevisionVideoProcessor

    image = onevision_image_processor(model)
    side = model.get_vision_tower().image_size
    return LlavaOnevisionVideoProcessor(
        size={"height": side, "width": side},
        image_mean=image.image_mean,
        image_std=image.image_std,
        resample=3,
    )


def onevision_processor(model: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """LlavaOnevisionProcessor around the image processor and the ``<image>`` tokenizer (needs torchvision)."""
    from transformers import LlavaOnevisionProcessor

    tower = model.get_vision_tower()
    _, strategy = feature_select(model)
    return LlavaOnevisionProcessor(
        image_processor=onevision_image_processor(model),
        tokenizer=tokenizer,
        video_processor=onevision_video_processor(model),
        num_image_tokens=tower.num_patches + int(tower.has_cls_token),  # per crop, CLS counted
        vision_feature_select_strategy=strategy,
        image_token=DEFAULT_IMAGE_TOKEN,
        vision_aspect_ratio=model.config.image_aspect_ratio,
        chat_template=chat_template,
    )


def check_importable(config: Any) -> list[str]:
    """What in a native LlavaOnevision config our model cannot take (empty when it can)."""
    problems = []
    vision = config.vision_config
    if anyres_max_patches(config.vision_aspect_ratio) is None:
        problems.append(f"vision_aspect_ratio {config.vision_aspect_ratio!r} (need anyres_max_N)")
    if vision.model_type == "siglip_vision_model":
        if config.vision_feature_layer != -1 or config.vision_feature_select_strategy != "full":
            problems.append(
                f"SigLIP with vision_feature_layer={config.vision_feature_layer!r} / "
                f"{config.vision_feature_select_strategy!r}: our SigLIP tower takes the last kept layer only "
                "(-1, 'full')"
            )
    elif vision.model_type != "clip_vision_model":
        problems.append(f"vision_config.model_type {vision.model_type!r} (need SigLIP or CLIP)")
    return problems


def our_mm_fields(native: Any) -> dict[str, Any]:
    """Our mm_* config fields for a native LlavaOnevision config."""
    vision = native.vision_config.to_dict()
    vision = {k: v for k, v in vision.items() if k not in ("model_type", "transformers_version")}
    if native.vision_config.model_type == "siglip_vision_model":
        # ours keeps the released tower's config and drops its last layer when it builds the tower
        vision.update(model_type="siglip_vision_model", num_hidden_layers=vision["num_hidden_layers"] + 1)
        layer, select = -2, "patch"
    else:
        layer = native.vision_feature_layer
        select = "patch" if native.vision_feature_select_strategy == "default" else "cls_patch"
    return dict(
        mm_vision_tower=vision.get("_name_or_path") or "vision-tower-from-native",
        mm_vision_config=vision,
        mm_hidden_size=vision["hidden_size"],
        mm_vision_select_layer=layer,
        mm_vision_select_feature=select,
        mm_patch_merge_type="spatial_unpad",
        mm_unpad_rounding="round",  # transformers' unpad
        image_aspect_ratio=native.vision_aspect_ratio,
        image_grid_pinpoints=_swap(native.image_grid_pinpoints),
    )


def save_processor(model: Any, tokenizer: Any, out: Path, chat_template: str | None = None) -> None:
    """Write the LlavaOnevisionProcessor files to ``out``.

    The processor object needs a video processor, and transformers' video processors need torchvision;
    without it ``write_processor_files`` writes the same files, which ``AutoProcessor`` reads wherever
    torchvision is installed (``tests/test_export_autoprocessor.py``).
    """
    if importlib.util.find_spec("torchvision") is not None:
        onevision_processor(model, tokenizer, chat_template).save_pretrained(out)
        return
    logger.warning(
        "torchvision is not installed: writing the LlavaOnevisionProcessor files without its object"
    )
    write_processor_files(model, tokenizer, out, chat_template)


def write_processor_files(model: Any, tokenizer: Any, out: Path, chat_template: str | None = None) -> None:
    """The LlavaOnevisionProcessor files without the processor object (no video processor, no torchvision)."""
    onevision_image_processor(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    tower = model.get_vision_tower()
    fields = dict(
        processor_class="LlavaOnevisionProcessor",
        num_image_tokens=tower.num_patches + int(tower.has_cls_token),
        vision_feature_select_strategy=feature_select(model)[1],
        image_token=DEFAULT_IMAGE_TOKEN,
        video_token="<video>",
        vision_aspect_ratio=model.config.image_aspect_ratio,
    )
    (out / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)
