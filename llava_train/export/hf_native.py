"""Conversion between our LLaVA model and transformers' native Llava / LlavaNext classes (import: hf_import.py).

Export (``export_hf``): our LLaVA model (any LLM family) + tokenizer -> a directory that
``AutoModelForImageTextToText.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)`` run
with no code of ours:

    flat merge, image_aspect_ratio pad/square     -> LlavaForConditionalGeneration + LlavaProcessor
    spatial_unpad merge, image_aspect_ratio anyres -> LlavaNextForConditionalGeneration + LlavaNextProcessor
    spatial_unpad merge, anyres_max_N              -> LlavaOnevisionForConditionalGeneration + its processor
                                                      (hf_onevision.py)

Anything else (a ``linear`` / ``mlp3x_gelu`` projector, S2 towers, plain ``spatial``, im_start/im_end
tokens) has no native counterpart and is refused with the reason.

Differences handled here (ours -> native):
- the image placeholder: ours is IMAGE_TOKEN_INDEX (-200), one per image; native is a real special token
  ``<image>`` (id = old vocab size), repeated once per image feature by the processor. Its embedding row is
  the mean of the others; its lm_head row is zero and ``generation_config.suppress_tokens`` holds it, so
  greedy decoding picks the same tokens as ours.
- ``mm_vision_select_feature``: ``patch`` (CLS dropped) = ``default``; ``cls_patch`` = ``full``.
- grid pinpoints: ours / LLaVA's are (width, height), transformers' are (height, width): each pair is
  swapped, the order kept. ``image_sizes`` passed to the native model are (height, width) too.
- state-dict keys (see ``_TO_NATIVE``); ``mm_projector.0/.2`` = ``multi_modal_projector.linear_1/_2``.

Not handled: the native unpad always rounds (``mm_unpad_rounding="round"``). A model trained with
``floor`` (the original's, the v1.6 / OneVision presets') is refused unless ``accept_native_rounding``:
the native model would then see two more feature rows (or columns) than training did for a few image
sizes (docs/FIDELITY.md).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data.chat_template import chat_template_jinja
from llava_train.data.conversation import Template, get_template
from llava_train.data.preprocess import encode_chunk
from llava_train.export import hf_onevision
from llava_train.model import LlavaConfig, LlavaLlamaForCausalLM
from llava_train.model.anyres import anyres_max_patches, parse_grid_pinpoints
from llava_train.model.families import native_text_config_class
from llava_train.model.projector import state_mismatch
from llava_train.model.vision_tower import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

# (ours, native) key prefixes; the first match wins. Ours may carry CLIP's pre-v5 `vision_model.` level.
_TO_NATIVE = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
_FROM_NATIVE = (
    ("model.vision_tower.", "model.vision_tower.vision_tower."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.image_newline", "model.image_newline"),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
_SELECT = {"patch": "default", "cls_patch": "full"}
_NATIVE_CLASS = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


# ----------------------------------------------------------------------------------------------
# Config and keys
# ----------------------------------------------------------------------------------------------


def native_kind(config: LlavaConfig) -> str:
    """ "llava", "llava_next" or "llava_onevision" for a model that maps onto a native class; raises with the reason otherwise."""
    problems = []
    if config.mm_projector_type != "mlp2x_gelu":
        problems.append(
            f"mm_projector_type={config.mm_projector_type!r}: the native projector is linear_1 -> gelu -> "
            "linear_2 (only 'mlp2x_gelu' maps)"
        )
    if getattr(config, "use_s2", False):
        problems.append("use_s2=True: the native classes have no multiscale (S2) tower")
    if config.mm_use_im_start_end or config.mm_use_im_patch_token:
        problems.append("mm_use_im_start_end / mm_use_im_patch_token: native processors add no such tokens")
    if config.mm_vision_select_feature not in _SELECT:
        problems.append(f"mm_vision_select_feature={config.mm_vision_select_feature!r}")
    merge, aspect = config.mm_patch_merge_type, config.image_aspect_ratio
    if merge == "flat" and aspect in ("pad", "square"):
        kind = "llava"
    elif merge == "spatial_unpad" and aspect == "anyres":
        kind = "llava_next"
    elif merge == "spatial_unpad" and anyres_max_patches(aspect) is not None:
        kind = "llava_onevision"
    else:
        kind = ""
        problems.append(
            f"mm_patch_merge_type={merge!r} with image_aspect_ratio={aspect!r}: only flat + pad/square "
            "(LlavaForConditionalGeneration), spatial_unpad + anyres (LlavaNextForConditionalGeneration) or "
            "spatial_unpad + anyres_max_N (LlavaOnevisionForConditionalGeneration) map"
        )
    if problems:
        raise ValueError("cannot export to the transformers-native format:\n  - " + "\n  - ".join(problems))
    return kind


def check_native_rounding(config: LlavaConfig, accept_native_rounding: bool = False) -> None:
    """Refuse a ``floor`` unpad (the original's), which no native class has, unless ``accept_native_rounding``.

    transformers' LlavaNext / LlavaOnevision always round; a flat merge (Llava) has no unpad.
    """
    if "unpad" not in config.mm_patch_merge_type or config.mm_unpad_rounding == "round":
        return
    effect = (
        "the native model rounds instead, which for a few image sizes keeps two more feature rows (or "
        "columns) than training did (docs/FIDELITY.md)"
    )
    if not accept_native_rounding:
        raise ValueError(
            f"mm_unpad_rounding={config.mm_unpad_rounding!r} (the original LLaVA's int() in unpad_image): {effect}. "
            "Export anyway with accept_native_rounding=True (launch/export.py ... accept_native_rounding=true), "
            "or keep the original layout (save_pretrained / load_original), which keeps the key"
        )
    logger.warning("exporting a mm_unpad_rounding=%r model: %s", config.mm_unpad_rounding, effect)


def swap_pinpoints(pinpoints: list) -> list[list[int]]:
    """(w, h) pairs <-> (h, w) pairs, order kept (the swap is its own inverse)."""
    return [[int(b), int(a)] for a, b in pinpoints]


def text_config_dict(config: LlavaConfig, vocab_size: int) -> dict[str, Any]:
    """The LLM part of our config (mm_* keys dropped) as a native ``text_config`` of the LLM's own family."""
    native = native_text_config_class(config)
    text_keys = set(native().to_dict())
    text = {k: v for k, v in config.to_dict().items() if k in text_keys}
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version"):
        text.pop(key, None)
    return {**text, "model_type": native.model_type, "vocab_size": vocab_size, "tie_word_embeddings": False}


def native_config(model: LlavaLlamaForCausalLM, image_token_index: int) -> Any:
    """LlavaConfig / LlavaNextConfig (transformers') of ``model``; vocab grows by the image token."""
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaNextConfig

    config = model.config
    kind = native_kind(config)
    tower = model.get_vision_tower()
    patches = tower.num_patches + (config.mm_vision_select_feature == "cls_patch")
    common = dict(
        vision_config=tower.config.to_dict(),
        text_config=text_config_dict(config, max(config.vocab_size, image_token_index + 1)),
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=_SELECT[config.mm_vision_select_feature],
        vision_feature_layer=config.mm_vision_select_layer,
        multimodal_projector_bias=True,
        image_seq_length=patches,
        tie_word_embeddings=False,
    )
    if kind == "llava":
        return HFLlavaConfig(**common)
    if kind == "llava_onevision":
        return hf_onevision.onevision_config(model, common)
    pinpoints = parse_grid_pinpoints(config.image_grid_pinpoints, tower.image_size)
    return LlavaNextConfig(**common, image_grid_pinpoints=swap_pinpoints(pinpoints))


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"no native mapping for state-dict key {key!r}")


def to_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original LLaVA) keys -> transformers 5 Llava / LlavaNext keys."""
    return {_rename(k, _TO_NATIVE): v for k, v in state.items()}


def from_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 Llava / LlavaNext keys -> ours (original LLaVA layout)."""
    return {_rename(k, _FROM_NATIVE): v for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names every missing / unexpected key and shape mismatch."""
    missing, unexpected, wrong = state_mismatch(module.state_dict(), state)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what}: weights do not fit the target model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatch {wrong[:5]} (the key mapping in llava_train/export/"
            "hf_native.py does not cover this model's layout)"
        )
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Export: ours -> native
# ----------------------------------------------------------------------------------------------


def native_tokenizer(tokenizer: Any) -> tuple[Any, int]:
    """A copy of ``tokenizer`` with ``<image>`` as a special token, and that token's id."""
    tok = copy.deepcopy(tokenizer)
    if DEFAULT_IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    return tok, image_id


@torch.no_grad()
def native_state_dict(model: LlavaLlamaForCausalLM, image_token_index: int) -> dict[str, torch.Tensor]:
    """Our weights in native keys; embeddings padded to ``image_token_index + 1`` rows where fewer.

    The image token's input row is the mean of the others (it is replaced by image features anyway);
    its lm_head row is zero (and suppressed at generation). An id inside the vocab is one of its unused
    padding rows past the tokenizer (Qwen2's 152064 rows for 151646 tokens), overwritten the same way.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = max(0, image_token_index + 1 - model.config.vocab_size)
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]  # [V, h]
    mean = embed.mean(0)  # [h]
    embed = torch.cat([embed, mean.expand(extra, -1)])
    head = torch.cat([head, head.new_zeros(extra, head.shape[1])])
    embed[image_token_index], head[image_token_index] = mean, 0.0
    state["model.embed_tokens.weight"], state["lm_head.weight"] = embed, head
    return to_native_state_dict(state)


def native_image_processor(model: LlavaLlamaForCausalLM) -> Any:
    """CLIP-style processor (Llava, with pad-to-square for ``pad``) or LlavaNext's, for the tower's side S."""
    from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil

    config, side = model.config, model.get_vision_tower().image_size
    common = dict(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,  # bicubic, as PIL's default resize in our pipeline
    )
    kind = native_kind(config)
    if kind == "llava_onevision":
        return hf_onevision.onevision_image_processor(model)
    if kind == "llava":
        # pad: pad to square first; anything else: shortest-edge resize + centre crop (data/image.py)
        return LlavaImageProcessorPil(**common, do_pad=config.image_aspect_ratio == "pad")
    pinpoints = swap_pinpoints(parse_grid_pinpoints(config.image_grid_pinpoints, side))
    return LlavaNextImageProcessorPil(**common, image_grid_pinpoints=pinpoints)


def _image_separator(tokenizer: Any, native_tok: Any) -> str:
    """What the chat template writes after ``<image>`` so the native ids equal ours after an image.

    Ours (and the original LLaVA's) encode the text after an image as a fresh string; the native
    tokenizer encodes it right after the special ``<image>`` token, where a non-legacy SentencePiece
    tokenizer adds no "▁": a " " puts it back. Byte-level BPE and legacy SentencePiece need nothing.
    """
    image_id = native_tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    probe = "\nWhat is it?"  # the text after an image in a user turn starts with its newline
    for sep in ("", " "):
        got = native_tok(DEFAULT_IMAGE_TOKEN + sep + probe, add_special_tokens=False)["input_ids"]
        if got == [image_id, *encode_chunk(probe, tokenizer)[0]]:
            return sep
    raise ValueError(
        f"{type(tokenizer).__name__}: no separator after <image> gives the training ids in the native "
        "tokenizer; export without template= and build prompts with tokenizer_image_token"
    )


def native_chat_template(template: str | Template, tokenizer: Any, native_tok: Any) -> str:
    """Jinja chat template rendering ``template``'s prompt; the processor's ids of it equal ours."""
    template = get_template(template) if isinstance(template, str) else template
    return chat_template_jinja(template, image_separator=_image_separator(tokenizer, native_tok))


def native_processor(model: LlavaLlamaForCausalLM, tokenizer: Any, chat_template: str | None = None) -> Any:
    """LlavaProcessor / LlavaNextProcessor around the image processor and the ``<image>`` tokenizer."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    if native_kind(model.config) == "llava_onevision":
        return hf_onevision.onevision_processor(model, tokenizer, chat_template)
    cls = LlavaProcessor if native_kind(model.config) == "llava" else LlavaNextProcessor
    tower = model.get_vision_tower()
    return cls(
        image_processor=native_image_processor(model),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=_SELECT[model.config.mm_vision_select_feature],
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        image_token=DEFAULT_IMAGE_TOKEN,
        chat_template=chat_template,
    )


def to_native_model(
    model: LlavaLlamaForCausalLM, image_token_index: int, accept_native_rounding: bool = False
) -> nn.Module:
    """The native Llava / LlavaNext / LlavaOnevision ForConditionalGeneration with our weights (fp32).

    ``accept_native_rounding``: see :func:`check_native_rounding`.
    """
    import transformers

    check_native_rounding(model.config, accept_native_rounding)
    config = native_config(model, image_token_index)
    cls = getattr(transformers, _NATIVE_CLASS[config.model_type])
    native = cls(config).to(model.dtype)
    load_strict(native, native_state_dict(model, image_token_index), "export to " + cls.__name__)
    native.generation_config.suppress_tokens = [image_token_index]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(native.generation_config, key, getattr(model.config, key, None))
    return native.eval()


def export_hf(
    model: LlavaLlamaForCausalLM,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    chat_template: str | None = None,
    template: str | Template | None = None,
    accept_native_rounding: bool = False,
) -> Path:
    """Write ``model`` + processor to ``out_dir`` in the transformers-native format; returns the dir.

    Load it back with ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)`` (with torchvision installed, pass ``use_fast=False`` for
    the PIL image processor, which resizes as training did; docs/MODEL_FAMILIES.md). ``template`` (the
    conversation template the model was trained with) gives the processor and tokenizer a
    ``chat_template``, so ``processor.apply_chat_template(messages, add_generation_prompt=True)`` builds
    our prompt ids; ``chat_template`` sets a Jinja string directly instead. ``accept_native_rounding``: export a model
    with the original's floor unpad to the native classes, which round (:func:`check_native_rounding`).
    """
    native_kind(model.config)  # refuse early, before copying anything
    if not accept_native_rounding:
        check_native_rounding(model.config)  # accepted: to_native_model logs the difference
    if DEFAULT_IMAGE_TOKEN in tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer already holds {DEFAULT_IMAGE_TOKEN!r} as an ordinary token; ours mark images with "
            "IMAGE_TOKEN_INDEX, so export from the tokenizer the model was trained with"
        )
    tok, image_id = native_tokenizer(tokenizer)
    if chat_template is None and template is not None:
        chat_template = native_chat_template(template, tokenizer, tok)
    if chat_template is not None:
        tok.chat_template = chat_template
    native = to_native_model(model, image_id, accept_native_rounding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native.save_pretrained(out)
    if native_kind(model.config) == "llava_onevision":
        hf_onevision.save_processor(model, tok, out, chat_template)
    else:
        native_processor(model, tok, chat_template).save_pretrained(out)
    logger.info("exported %s (image token %d) to %s", type(native).__name__, image_id, out)
    return out


# ----------------------------------------------------------------------------------------------
# Import: native -> ours
# ----------------------------------------------------------------------------------------------
