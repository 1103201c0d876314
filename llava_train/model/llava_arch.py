"""LLaVA glue: the vision modules on the LLM (:class:`LlavaMetaModel`) and the multimodal forward
(:class:`LlavaMetaForCausalLM`): encode images, merge their crops, insert them into the text.

Notation: b batch, s input length, T output length, n_img images in the batch, L_i feature tokens
of image i, P patches per side of one crop, h LLM hidden size, d_v vision hidden size.

The merge maths are pure functions in :mod:`llava_train.model.merge`; this module wires them to
the model's tower, projector, newline and config. Both mixins are family-agnostic: a concrete class
per LLM family (llava_llama.py) provides ``get_model()`` and the decoder.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import initialization as init

from llava_train.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava_train.model.merge import (
    drop_padding,
    merge_image_crops,
    merge_text_and_images,
    packed_attention_mask,
    packed_position_ids,
    select_used_images,
)
from llava_train.model.projector import build_vision_projector, load_projector, load_projector_weights
from llava_train.model.vision_tower import CLIPVisionTower, build_vision_tower
from llava_train.model.zero3 import gathered, is_sharded

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Vision modules on the base model
# ----------------------------------------------------------------------------------------------


def init_image_newline(module: nn.Module) -> None:
    """``image_newline`` ~ randn / sqrt(hidden), as the original (a no-op for modules without one)."""
    newline = getattr(module, "image_newline", None)
    if isinstance(newline, nn.Parameter):
        init.normal_(newline, mean=0.0, std=1.0 / math.sqrt(newline.shape[0]))


class LlavaMetaModel:
    """Mixin for the base LLM: owns ``vision_tower``, ``mm_projector`` and ``image_newline``."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in (getattr(config, "mm_patch_merge_type", None) or ""):
                self.image_newline = nn.Parameter(self._newline_init(config.hidden_size))

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_image_newline(module)

    @staticmethod
    def _newline_init(hidden_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(hidden_size, dtype=dtype) / math.sqrt(hidden_size)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        tower = getattr(self, "vision_tower", None)
        return tower[0] if isinstance(tower, list) else tower

    def initialize_vision_modules(self, model_args: Any, fsdp: list | None = None) -> None:
        """Build (or load) the tower, build the projector and newline, record the mm_* config keys.

        ``model_args`` needs ``vision_tower``; optional: ``mm_vision_select_layer``,
        ``mm_vision_select_feature``, ``mm_projector_type``, ``mm_patch_merge_type``,
        ``pretrain_mm_mlp_adapter``, ``mm_vision_config``, ``use_s2``, ``s2_scales``.
        New modules take the dtype and device of the LLM's embeddings.
        """
        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = getattr(model_args, "mm_vision_select_layer", -2)
        config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        config.mm_patch_merge_type = getattr(model_args, "mm_patch_merge_type", "flat") or "flat"
        if config.mm_vision_select_feature == "cls_patch" and config.mm_patch_merge_type != "flat":
            raise ValueError(  # the spatial grid has no place for the CLS feature (the original fails too)
                f"mm_vision_select_feature=cls_patch with mm_patch_merge_type={config.mm_patch_merge_type}: "
                "use mm_patch_merge_type=flat, or mm_vision_select_feature=patch"
            )
        config.mm_vision_config = getattr(model_args, "mm_vision_config", None) or config.mm_vision_config
        for key in ("use_s2", "s2_scales"):
            if hasattr(model_args, key):
                setattr(config, key, getattr(model_args, key))
        weight = self.embed_tokens.weight
        tower = self.get_vision_tower()
        if tower is None:
            tower = build_vision_tower(config)
            if not any(is_sharded(p) for p in tower.parameters()):  # zero.Init placed a pretrained one
                tower = tower.to(device=weight.device, dtype=weight.dtype)
            self.vision_tower = [tower] if fsdp else tower
        else:
            tower.load_model()

        config.use_mm_proj = True
        config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear") or "linear"
        config.mm_hidden_size = tower.hidden_size
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(config).to(device=weight.device, dtype=weight.dtype)
            if "unpad" in config.mm_patch_merge_type:
                newline = self._newline_init(config.hidden_size, weight.dtype).to(weight.device)
                self.image_newline = nn.Parameter(newline)
        else:
            self.mm_projector.requires_grad_(True)

        path = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if path:
            load_projector(self.mm_projector, path)


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: image encoding and the multimodal merge. Needs ``get_model()``."""

    def get_model(self) -> LlavaMetaModel:  # pragma: no cover - provided by the concrete class
        raise NotImplementedError

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, P*P, h]."""
        features = self.get_model().get_vision_tower()(images)  # [n, P*P, d_v], in the pixels' dtype
        projector = self.get_model().mm_projector
        return projector(features.to(next(projector.parameters()).dtype))  # fp32 pixels, bf16 model: no mixup

    def image_features(
        self, images: torch.Tensor | list[torch.Tensor], image_sizes: list | None
    ) -> list[torch.Tensor]:
        """Per-image merged features [L_i, h]: stacked images are flat; lists / 5-D go by merge type."""
        # (w, h) pairs as plain ints: a tensor [n, 2] works too, and the index cache keys by value.
        if image_sizes is not None:
            image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        if not isinstance(images, list) and images.ndim == 4:
            return list(self.encode_images(images))  # n_img x [P*P, h]
        images = [x[None] if x.ndim == 3 else x for x in images]  # each [crops, 3, S, S]
        if not images:
            return []
        features = self.encode_images(torch.cat(images))  # [sum crops, P*P, h]
        config = self.config
        merge_type = getattr(config, "mm_patch_merge_type", "flat") or "flat"
        return merge_image_crops(
            features,
            [x.shape[0] for x in images],
            image_sizes,
            merge_type=merge_type,
            image_aspect_ratio=getattr(config, "image_aspect_ratio", "square"),
            grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
            crop_size=self.get_vision_tower().image_size,
            newline=getattr(self.get_model(), "image_newline", None),
            unpad_rounding=config.mm_unpad_rounding,
        )

    def _unused_mm_anchor(self) -> torch.Tensor:
        """0 * (tower + projector + newline) of one blank crop, for an image-free batch under autograd.

        Every multimodal module still runs: DDP needs each trainable parameter (a tuned tower's too) in
        the graph, and ZeRO-3 needs every rank to gather the same parameters, images or not (the original
        feeds a blank image to text-only samples for the same reason). Built before the text embedding, as
        image features are: backward runs later-built nodes first, so the gradients become ready in the same
        order as on an image batch, and ZeRO-2's gradient buckets (filled in that order) match across ranks
        whose micro-batches differ in modality.
        """
        model = self.get_model()
        tower = model.get_vision_tower()
        side = tower.image_size
        blank = torch.zeros(1, 3, side, side, device=tower.device, dtype=tower.dtype)  # [1, 3, S, S]
        anchor = self.encode_images(blank).sum()
        newline = getattr(model, "image_newline", None)
        if newline is not None:
            anchor = anchor + newline.sum()
        return anchor * 0.0

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple:
        """Returns (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels).

        Pass-through (input_ids returned, embeds None) for a decode step (s == 1) or with no tower, and
        for image-free batches outside autograd. position_ids / attention_mask / labels come back None
        when they came in None (original convention); the mask keeps its dtype.

        Packed rows (``seq_ids`` [b, s], data/packing.py): position ids restart at every sample and the
        attention mask is :func:`packed_attention_mask` (4D block-diagonal causal for sdpa / eager, a
        document-causal BlockMask for flex_attention). Varlen kernels (sdpa_varlen, flash-attention) get
        no mask and the rows laid end to end without their padding (:func:`drop_padding`): [1, N].
        """
        self._check_attention_device(input_ids.device)
        if seq_ids is not None:
            return self._prepare_packed(input_ids, past_key_values, labels, images, image_sizes, seq_ids)
        tower = self.get_vision_tower()
        if tower is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if images is None:
            if not torch.is_grad_enabled():
                return input_ids, position_ids, attention_mask, past_key_values, None, labels
            anchor = (
                self._unused_mm_anchor()
            )  # before the embedding, as image features are: see its docstring
            embeds = self.get_model().embed_tokens(input_ids) + anchor  # [b, s, h]
            return None, position_ids, attention_mask, past_key_values, embeds, labels

        keep = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        full_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        padding_side = getattr(self.config, "tokenizer_padding_side", "right") or "right"
        embeds, new_labels, mask, new_pos, _ = self._embed_and_merge(
            input_ids, keep, full_labels, images, image_sizes, padding_side
        )
        new_mask = None if attention_mask is None else mask.to(attention_mask.dtype)
        new_pos = None if position_ids is None else new_pos.to(position_ids.dtype)
        new_labels = None if labels is None else new_labels
        return None, new_pos, new_mask, past_key_values, embeds, new_labels

    def _embed_and_merge(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None,
        padding_side: str,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple:
        """Encode images, embed text, merge (:func:`merge_text_and_images`); keeps the mm modules in the graph."""
        features = self.image_features(images, image_sizes) if images is not None else []
        is_image = (input_ids == IMAGE_TOKEN_INDEX) & keep  # [b, s]
        used = select_used_images(is_image.sum(1), len(features))
        if used is not None:
            features = [features[i] for i in used.tolist()]
        anchor = None
        if not features and torch.is_grad_enabled() and self.get_vision_tower() is not None:
            anchor = self._unused_mm_anchor()  # before the embedding, as image features are
        text_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0)  # [b, s]
        text_embeds = self.get_model().embed_tokens(text_ids)  # [b, s, h]
        if anchor is not None:
            text_embeds = text_embeds + anchor
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        return merge_text_and_images(
            text_embeds, input_ids, keep, labels, features, max_length, padding_side, seq_ids
        )

    def _prepare_packed(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None,
        seq_ids: torch.Tensor,
    ) -> tuple:
        """Packed rows: merge, then per-sample position ids and the block-diagonal causal mask."""
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("packed rows (seq_ids) are for training / scoring; generate without seq_ids")
        if seq_ids.shape != input_ids.shape:
            raise ValueError(f"seq_ids {tuple(seq_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        full_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        embeds, new_labels, _, _, new_seq = self._embed_and_merge(
            input_ids, seq_ids > 0, full_labels, images, image_sizes, "right", seq_ids
        )
        position_ids = packed_position_ids(new_seq)  # [b, T]
        mask = self._packed_mask(new_seq, embeds.dtype)  # [b, 1, T, T], one per layer type, or None
        if mask is None:  # varlen kernels: one row of the real tokens (transformers' flash path needs b = 1)
            embeds, position_ids, new_labels = drop_padding(new_seq > 0, embeds, position_ids, new_labels)
        return None, position_ids, mask, past_key_values, embeds, None if labels is None else new_labels

    def _check_attention_device(self, device: torch.device) -> None:
        """FlexAttention has a CPU forward but no CPU backward: say so before torch's kernel check does."""
        attn = getattr(self.config, "_attn_implementation", None)
        if attn == "flex_attention" and device.type == "cpu" and torch.is_grad_enabled():
            raise NotImplementedError(
                f"attn_implementation=flex_attention cannot train on CPU (torch {torch.__version__} has no "
                "CPU backward for FlexAttention): train on CUDA, or use model.attn_implementation=sdpa on "
                "CPU (packed rows get a block-diagonal mask); flex on CPU works under torch.no_grad()"
            )

    def _packed_mask(self, seq_ids: torch.Tensor, dtype: torch.dtype) -> Any:
        """:func:`packed_attention_mask` for this decoder: windowed for sliding-window layers (Mistral's
        ``sliding_window``), and a {layer type: mask} mapping for decoders that mix layer types (Gemma 3).
        A [b, 1, T, T] tensor (sdpa / eager), a BlockMask (flex_attention) or None (flash-attention)."""
        config = self.config
        attn = getattr(config, "_attn_implementation", None) or "sdpa"
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:  # every layer alike: sliding when the config has a window (Mistral)
            return packed_attention_mask(seq_ids, attn, dtype, window)
        masks = {"full_attention": packed_attention_mask(seq_ids, attn, dtype)}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = packed_attention_mask(seq_ids, attn, dtype, window)
        return None if masks["full_attention"] is None else masks

    def initialize_vision_tokenizer(self, model_args: Any, tokenizer: Any) -> None:
        """Add <im_patch> / <im_start>,<im_end> as the original; new embedding rows = mean of the old."""
        tune_adapter = getattr(model_args, "tune_mm_mlp_adapter", False)
        if getattr(model_args, "mm_use_im_patch_token", False):
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
        if getattr(model_args, "mm_use_im_start_end", False):
            num_new = tokenizer.add_tokens(
                [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True
            )
            self.resize_token_embeddings(len(tokenizer))
            if num_new > 0:
                self._mean_init_new_rows(num_new)
            if tune_adapter:
                self.get_input_embeddings().requires_grad_(True)
                if self.get_output_embeddings().weight is not self.get_input_embeddings().weight:  # untied
                    self.get_output_embeddings().requires_grad_(False)
            path = getattr(model_args, "pretrain_mm_mlp_adapter", None)
            if path:
                self._load_pretrained_token_rows(path, tokenizer)
        elif getattr(model_args, "mm_use_im_patch_token", False) and tune_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)

    @torch.no_grad()
    def _mean_init_new_rows(self, num_new: int) -> None:
        pair = (self.get_input_embeddings().weight, self.get_output_embeddings().weight)
        weights = list({id(w): w for w in pair}.values())  # once if tied
        with gathered(weights):
            for weight in weights:
                weight[-num_new:] = weight[:-num_new].mean(dim=0, keepdim=True)

    @torch.no_grad()
    def _load_pretrained_token_rows(self, path: str, tokenizer: Any) -> None:
        """The stage-1 rows of <im_start> / <im_end> (a whole saved matrix, or just those 2 rows).

        Rows are found by token id, so a tokenizer that already had the tokens (saved by stage 1) loads
        them too, and no other row is touched.
        """
        saved = load_projector_weights(path).get("model.embed_tokens.weight")
        if saved is None:
            return
        weight = self.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN])
        with gathered([weight]):
            saved = saved.to(device=weight.device, dtype=weight.dtype)  # an indexed write needs one device
            rows = torch.tensor(ids, device=weight.device)
            if saved.shape == weight.shape:
                weight[rows] = saved[rows]
            elif saved.shape == (len(ids), weight.shape[1]):
                weight[rows] = saved
            else:
                raise ValueError(
                    f"embed_tokens in {path} has shape {tuple(saved.shape)}; expected {tuple(weight.shape)} "
                    f"or ({len(ids)}, {weight.shape[1]}) for the image start / end tokens"
                )
