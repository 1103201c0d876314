"""What every LLaVA causal LM shares, whatever its decoder family: the mm_* config keys, and the
image-aware ``forward`` / ``generate`` on top of the family's own (transformers') causal LM.

A family is one small file (llava_llama.py, llava_mistral.py, llava_qwen.py, llava_qwen3.py, llava_gemma3.py):
a config class ``(FamilyConfig, LlavaConfigKeys)``, a base model ``(LlavaMetaModel, FamilyModel)`` and a
causal LM ``(LlavaForCausalLMMixin, FamilyForCausalLM)`` naming its base model; docs/MODEL_FAMILIES.md says
how to add one. The mixins come first in the MRO, so ``super().forward`` is the family's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_train.constants import IGNORE_INDEX
from llava_train.model import varlen
from llava_train.model.anyres import check_unpad_rounding
from llava_train.model.llava_arch import LlavaMetaForCausalLM, init_image_newline
from llava_train.model.merge import drop_padding


@dataclass(repr=False)
class LlavaConfigKeys:
    """The original LLaVA ``mm_*`` keys plus ``mm_vision_config`` (the tower's config dict) and
    ``mm_unpad_rounding`` (absent from the original's configs: "round" when a config.json lacks it), on any
    LLM config."""

    mm_vision_tower: str | None = None
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_projector_type: str = "linear"
    mm_patch_merge_type: str = "flat"
    mm_unpad_rounding: str = "round"  # "floor": the original's int() in unpad_image (docs/FIDELITY.md)
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: list | str | None = None
    tokenizer_model_max_length: int | None = None
    tokenizer_padding_side: str = "right"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    use_mm_proj: bool = False
    mm_vision_config: dict | None = None

    def validate_mm_unpad_rounding(self) -> None:
        """A strict-dataclass class validator: runs when the config is built, loaded or saved."""
        check_unpad_rounding(self.mm_unpad_rounding)


def _one_run_a_row(attention_mask: Any) -> bool:
    """A [b, T] padding mask whose real tokens are one contiguous run a row (left or right padding)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        return False
    real = attention_mask.bool()
    runs = real[:, :1].long() + (real[:, 1:] & ~real[:, :-1]).sum(1, keepdim=True)  # [b, 1] runs a row
    return bool((runs <= 1).all())


class LlavaForCausalLMMixin(LlavaMetaForCausalLM):
    """The image-aware causal LM. A family class sets ``base_model_class`` (its ``LlavaMetaModel``)."""

    base_model_class: type
    # liger's fused linear cross-entropy (model/liger.py, training.liger_kernel); None: lm_head, then F.cross_entropy
    fused_linear_cross_entropy: Any = None

    def __init__(self, config: Any) -> None:
        # The family's own __init__ would build a plain decoder first: build ours instead, as it does.
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> Any:
        return self.model

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        init_image_newline(module)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        seq_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Merge images into the text, then the family's decoder forward.

        ``num_items_in_batch`` (in kwargs) makes the loss sum(token CE) / num_items_in_batch.
        ``cache`` is transformers 5's name for ``past_key_values``; either is accepted.
        ``seq_ids`` [b, s] (packed rows, data/packing.py: sample index per token, 0 = padding) replaces
        attention_mask / position_ids: positions restart per sample and no token attends across samples.
        In training mode with labels, logits are computed only where a label is supervised (see
        :meth:`_supervised_loss`) and the output's ``logits`` is None; eval mode returns full logits, or
        the last ``logits_to_keep`` positions' (generate asks for 1 at prefill, as transformers' LMs do).
        Under ``sdpa_varlen`` or flash-attention, packed rows run (and eval returns their logits) as one
        row of their real tokens, [1, N, V]; under ``sdpa_varlen`` padded rows train that way too.
        """
        cache = cache if cache is not None else past_key_values
        if seq_ids is not None and inputs_embeds is not None:
            raise ValueError("seq_ids (packing) needs input_ids, not inputs_embeds")
        if seq_ids is not None:
            # A KV cache of packed rows is meaningless, and transformers reads packing from the position
            # ids (flash-attention varlen, or no 4D mask) only when no cache is passed.
            use_cache = False
        if inputs_embeds is None:
            input_ids, position_ids, attention_mask, cache, inputs_embeds, labels = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids,
                    position_ids,
                    attention_mask,
                    cache,
                    labels,
                    images,
                    image_sizes,
                    seq_ids=seq_ids,
                )
            )
        masks = contextlib.nullcontext()
        is_varlen = getattr(self.config, "_attn_implementation", None) == varlen.NAME
        if is_varlen and seq_ids is not None:
            kwargs[varlen.SEGMENTS_KWARG] = varlen.packed_segments(position_ids)
            masks = varlen.segments_given()  # the kernel reads the segments: no mask to build
        elif (
            is_varlen
            and self.training
            and labels is not None
            and cache is None
            and _one_run_a_row(attention_mask)
        ):
            # padded rows in training: the real tokens end to end, one segment a row (padding-free)
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.get_model().embed_tokens(input_ids), None
            real = attention_mask.bool()  # [b, T]
            if position_ids is None:  # transformers' default, what sdpa would see
                position_ids = torch.arange(real.shape[1], device=real.device)
            position_ids = position_ids.expand_as(real)  # [T] or [1, T] -> [b, T]
            inputs_embeds, position_ids, labels = drop_padding(real, inputs_embeds, position_ids, labels)
            kwargs[varlen.SEGMENTS_KWARG] = varlen.row_segments(real.sum(1).tolist())
            attention_mask, masks = None, varlen.segments_given()
        if return_dict is not None:
            kwargs["return_dict"] = return_dict
        decoder_inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        with masks:
            if labels is not None and self.training:
                num_items = kwargs.pop("num_items_in_batch", None)
                outputs = self.model(**decoder_inputs, **kwargs)
                loss = self._supervised_loss(outputs.last_hidden_state, labels, num_items)
                return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
            return super().forward(**decoder_inputs, labels=labels, logits_to_keep=logits_to_keep, **kwargs)

    def _supervised_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Next-token cross-entropy from the lm_head rows that are supervised, summed / supervised count.

        Same value as transformers' causal-LM loss, without the [b, T, vocab] logits: in LLaVA batches
        most positions (image features, prompts, padding) are IGNORE_INDEX, and the vocab projection
        of those rows was most of a small model's step. ``num_items_in_batch`` (supervised tokens
        across gradient accumulation) is the divisor when given; an all-ignored batch gives loss 0.
        With liger's fused linear cross-entropy (model/liger.py) the same sum, from chunks of the logits.
        """
        targets = labels[:, 1:].to(hidden.device)  # [b, T-1] the token each position predicts
        keep = targets != IGNORE_INDEX  # [b, T-1]
        supervised = hidden[:, :-1][keep]  # [n_sup, d]
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma: as its own forward does
        if self.fused_linear_cross_entropy is not None:
            loss = self.fused_linear_cross_entropy(
                supervised, self.lm_head.weight, targets[keep], reduction="sum", softcap=cap or None
            )
        else:
            logits = self.lm_head(supervised).float()  # [n_sup, V]
            if cap:
                logits = torch.tanh(logits / cap) * cap
            loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        denom = keep.sum() if num_items_in_batch is None else num_items_in_batch
        return loss / torch.as_tensor(denom, device=loss.device).clamp(min=1)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list | None = None,
        **kwargs: Any,
    ) -> Any:
        """Greedy / sampled generation from token ids plus images; returns the new tokens only.

        The prompt is merged once into ``inputs_embeds``; later steps reuse the KV cache. With no
        attention mask given, an all-ones mask is assumed so the merged padding is masked out.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("pass input ids (inputs=) and images; inputs_embeds is built here")
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs, dtype=torch.long)
        embeds = None
        if images is not None:
            inputs, position_ids, attention_mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes
            )
        if embeds is None:
            embeds = self.get_model().embed_tokens(inputs)
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=embeds, **kwargs
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict:
        """Images go to the model on the first step only; later steps are text with the KV cache."""
        images = kwargs.pop("images", None)
        image_sizes = kwargs.pop("image_sizes", None)
        inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if images is not None and is_first_iteration:
            inputs["images"] = images
            inputs["image_sizes"] = image_sizes
        return inputs
