"""FLOP accounting of a LLaVA training step: model FLOPs (MFU) and hardware FLOPs (HFU), per component.

Notation: T tokens of a micro-batch (sum of the samples' merged lengths L_i, image feature tokens
included, padding excluded), h LLM hidden, n_h / n_kv query / key-value heads of width d_h, I MLP
width, V vocabulary, c crops through the tower, t tokens per crop in the tower (P*P, + 1 with a CLS
token), d / I_v the tower's hidden / MLP width, p its patch side.

Conventions (docs/THROUGHPUT.md, "FLOPs"):
- Matmuls only, 2 FLOPs per multiply-add. Norms, activations, softmax, RoPE, embedding lookups and the
  cross-entropy are not counted. Padding is never counted: both figures measure work on real tokens.
- LLM forward: 2 * N_mm per token, N_mm = the decoder layers' matmul weights
  (h*n_h*d_h + 2*h*n_kv*d_h + n_h*d_h*h + 3*h*I per layer: gated MLP), plus the lm_head 2*h*V per row it
  runs on: in training only the supervised rows (the loss computes no other logits, llava_lm.py), so a
  batch with labels counts those (``supervised``), as padding is not counted either. The input embedding
  is a gather; tied embeddings change the parameter count, not the FLOPs.
- Attention forward, per sample and layer: QK^T and AV, 2 * 2 * L * K * n_h * d_h with K = L (full) or
  min(L, W) (a sliding window W). No causal halving, as PaLM (Chowdhery et al. 2022, app. B) and
  Megatron-LM (Narayanan et al. 2021, eq. 3) count, so MFU compares with theirs. A packed row counts each
  sample's own L (its attention is block-diagonal), never the row's length.
- Tower forward per crop: 2*t*(4*d^2 + 2*d*I_v) + 4*t^2*d per layer (bidirectional) + the patch embedding
  2*P*P*3*p^2*d; every built layer runs (CLIP computes the layers after the selected one too).
- Projector forward: 2 * in * out per linear and per feature token (P*P per crop, + 1 with cls_patch).
- Backward, per matmul: the input gradient is 1x forward when anything upstream trains (the gradient must
  pass through), the weight gradient 1x forward when the weight trains. A trained part costs 3x forward;
  a frozen part a trainable part upstream needs costs 2x (stage 1's LLM, passing the gradient to the
  projector); a frozen part with nothing trainable upstream (the frozen tower) 1x. Attention has no
  weights: its backward is 2x forward wherever the gradient passes through the layer. The tower's
  backward covers only the layers the selected feature depends on. Within the decoder stack the first
  layer has no input gradient when nothing below it trains (layer granularity).
- LoRA: the base weights are frozen (input gradients only); each adapter (A: in -> r, B: r -> out) adds
  2 * r * (in + out) per token forward and 2x that backward.
- HFU = MFU's FLOPs + gradient-checkpointing recompute (one more forward of every checkpointed layer whose
  backward runs) + the blank crop an image-free batch runs through the tower and projector under autograd.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlmShape:
    """The decoder's sizes; ``windows`` holds one sliding window (or None: full attention) per layer."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False
    windows: tuple[int | None, ...] = ()

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def params(self) -> int:
        """Matmul weights + the input embedding (once when tied); norms left out."""
        embed = 0 if self.tied_embeddings else self.hidden * self.vocab
        return self.layers * self.layer_matmul_params + self.head_params + embed

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


@dataclass(frozen=True)
class TowerShape:
    """A ViT tower; ``backward_layers`` = the layers the selected feature depends on; ``crop_scale`` = base
    crops the tower runs per input crop (S2's multiscale: sum over scales of (scale / S)^2)."""

    layers: int
    hidden: int
    intermediate: int
    patch: int
    image_size: int
    cls_token: bool
    backward_layers: int
    crop_scale: int = 1

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls_token)


@dataclass(frozen=True)
class Trainable:
    """What trains (weights) and which layers are checkpointed; ``lora_params`` = adapter weights, all layers."""

    llm: bool = False
    lm_head: bool = False
    embeddings: bool = False
    lora_params: int = 0
    projector: bool = False
    image_newline: bool = False
    tower: bool = False
    checkpoint_llm: bool = False
    checkpoint_tower: bool = False


@dataclass(frozen=True)
class FlopModel:
    """Everything the count needs: shapes, the projector's linears (in, out) and its tokens per crop."""

    llm: LlmShape
    tower: TowerShape | None
    projector: tuple[tuple[int, int], ...]
    projector_tokens: int
    trainable: Trainable


@dataclass
class Flops:
    """FLOPs of one or more micro-batches: ``model`` (MFU), ``hardware`` (HFU), per-component ``parts``."""

    model: float = 0.0
    hardware: float = 0.0
    tokens: int = 0
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, other: Flops) -> None:
        self.model += other.model
        self.hardware += other.hardware
        self.tokens += other.tokens
        for k, v in other.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v


def llm_forward(shape: LlmShape, lengths: Sequence[int]) -> tuple[float, float, float]:
    """(decoder-layer linears, attention, lm_head) forward FLOPs of samples of ``lengths``."""
    tokens = sum(lengths)
    linear = 2.0 * shape.layers * shape.layer_matmul_params * tokens
    width = shape.heads * shape.head_dim
    attention = 0.0
    for layer in range(shape.layers):
        w = shape.window(layer)
        attention += sum(4.0 * n * (n if w is None else min(n, w)) * width for n in lengths)
    return linear, attention, 2.0 * shape.head_params * tokens


def tower_forward(shape: TowerShape, crops: int) -> tuple[float, float, float]:
    """(per-layer linears summed over layers, attention summed over layers, patch embedding) forward FLOPs."""
    c, t, d = crops * shape.crop_scale, shape.tokens, shape.hidden
    linear = 2.0 * c * t * (4 * d * d + 2 * d * shape.intermediate) * shape.layers
    attention = 4.0 * c * t * t * d * shape.layers
    patch = 2.0 * c * shape.patches * 3 * shape.patch**2 * d
    return linear, attention, patch


def projector_forward(linears: Sequence[tuple[int, int]], tokens: int) -> list[float]:
    """Forward FLOPs of each projector linear over ``tokens`` feature tokens."""
    return [2.0 * i * o * tokens for i, o in linears]


def training_flops(
    fm: FlopModel,
    lengths: Sequence[int],
    crops: int,
    image_free: bool = False,
    supervised: int | None = None,
) -> Flops:
    """Forward + backward FLOPs of one micro-batch: samples of merged ``lengths``, ``crops`` tower crops.

    ``image_free``: the batch has no image, so the model runs one blank crop for the autograd graph
    (hardware FLOPs only). ``supervised``: the rows the lm_head runs on (every token when None). The
    rules are the module docstring's.
    """
    tr = fm.trainable
    parts: dict[str, float] = {}
    recompute = 0.0
    tower_grad = tr.tower and fm.tower is not None
    # The vision side: tower -> projector.
    vision_model = _vision_flops(fm, crops, parts)
    anchor = _vision_flops(fm, 1, {}) if image_free else 0.0
    # The decoder: anything feeding it that trains (tower, projector, embeddings, newline) needs its input grads.
    upstream = tr.projector or tower_grad or tr.embeddings or tr.image_newline
    layers_train = tr.llm or tr.lora_params > 0
    linear, attention, head = llm_forward(fm.llm, lengths)
    if supervised is not None:
        head = 2.0 * fm.llm.head_params * supervised
    n = fm.llm.layers
    input_grad_layers = n if upstream else (n - 1 if layers_train else 0)
    passes = upstream or layers_train
    lora = 2.0 * tr.lora_params * sum(lengths)
    decoder_bwd = (
        linear * input_grad_layers / n + (linear if tr.llm else 0.0) + (2 * attention if passes else 0.0)
    )
    parts["llm_forward"] = linear + attention + head + lora
    parts["llm_backward"] = decoder_bwd + (head if passes else 0.0) + (head if tr.lm_head else 0.0) + 2 * lora
    if tr.checkpoint_llm and passes:
        recompute += linear + attention + lora
    if tr.checkpoint_tower and tower_grad:
        t_linear, t_attention, _ = tower_forward(fm.tower, crops)
        recompute += (t_linear + t_attention) * fm.tower.backward_layers / fm.tower.layers
    parts["recompute"] = recompute
    model = vision_model + parts["llm_forward"] + parts["llm_backward"]
    return Flops(model=model, hardware=model + recompute + anchor, tokens=int(sum(lengths)), parts=parts)


def _vision_flops(fm: FlopModel, crops: int, parts: dict[str, float]) -> float:
    """Forward + backward FLOPs of tower and projector over ``crops`` crops; fills ``parts``."""
    if fm.tower is None or crops == 0:
        return 0.0
    tr = fm.trainable
    linear, attention, patch = tower_forward(fm.tower, crops)
    share = fm.tower.backward_layers / fm.tower.layers
    # Tower: weights and input grads of the used layers, the patch embedding's weight grad (pixels need none).
    tower_bwd = (2 * linear + 2 * attention) * share + patch if tr.tower else 0.0
    proj = projector_forward(fm.projector, crops * fm.tower.crop_scale * fm.projector_tokens)
    # Projector: weight grads if it trains; input grads of linear k when anything before it trains.
    proj_bwd = sum(proj) if tr.projector else 0.0
    proj_bwd += sum(f for k, f in enumerate(proj) if tr.tower or (k > 0 and tr.projector))
    parts["tower_forward"] = linear + attention + patch
    parts["tower_backward"] = tower_bwd
    parts["projector_forward"] = sum(proj)
    parts["projector_backward"] = proj_bwd
    return parts["tower_forward"] + tower_bwd + sum(proj) + proj_bwd


# ---- from a built model and a collated batch ---------------------------------------------------


def flop_model(model: Any, fsdp_checkpointing: bool = False) -> FlopModel:
    """The :class:`FlopModel` of a built (stage-applied) LLaVA model; a PEFT wrapper is looked through.

    Sizes come from the configs (ZeRO-3 shards the parameters), what trains from ``requires_grad``, and
    checkpointing from the layers' ``gradient_checkpointing`` flag (set by the Trainer at train start).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from llava_train.model.zero3 import full_numel
    from llava_train.train.stages import component_of

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if get_base else model
    c = base.config
    heads = c.num_attention_heads
    llm = LlmShape(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        intermediate=c.intermediate_size,
        vocab=c.vocab_size,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        windows=_windows(c),
    )
    trains: dict[str, bool] = {}
    lora_params = 0
    for name, p in model.named_parameters():
        part = component_of(name)
        if part == "llm":
            part = "embeddings" if "embed_tokens" in name else "llm"
        if part == "lora":
            lora_params += full_numel(p) if p.requires_grad else 0
        trains[part] = trains.get(part, False) or p.requires_grad
    checkpointed = {
        component_of(name + ".weight")
        for name, m in model.named_modules()
        if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)
    }
    trainable = Trainable(
        llm=trains.get("llm", False),
        lm_head=trains.get("lm_head", False) or (llm.tied_embeddings and trains.get("embeddings", False)),
        embeddings=trains.get("embeddings", False),
        lora_params=lora_params,
        projector=trains.get("projector", False),
        image_newline=trains.get("image_newline", False),
        tower=trains.get("vision_tower", False),
        checkpoint_llm=fsdp_checkpointing or bool(checkpointed & {"llm", "lora"}),
        checkpoint_tower="vision_tower" in checkpointed,
    )
    tower = base.get_vision_tower()
    inner = base.get_model()
    linears = tuple(
        (m.in_features, m.out_features)
        for m in inner.mm_projector.modules()
        if isinstance(m, torch.nn.Linear)
    )
    cls_patch = getattr(tower, "select_feature", "patch") == "cls_patch" if tower is not None else False
    return FlopModel(
        llm=llm,
        tower=_tower_shape(tower) if tower is not None else None,
        projector=linears,
        projector_tokens=(tower.num_patches + int(cls_patch)) if tower is not None else 0,
        trainable=trainable,
    )


def _windows(config: Any) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return ()
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if getattr(config, "use_sliding_window", True):
        return (window,) * config.num_hidden_layers
    return ()


def _tower_shape(tower: Any) -> TowerShape:
    c = tower.config
    layers = c.num_hidden_layers
    used = layers
    if tower.has_cls_token:  # CLIP: hidden_states[select_layer]; hidden_states[0] is the embedding output
        used = getattr(tower, "select_layer", -2) % (layers + 1)
    base = c.image_size
    scales = getattr(tower, "s2_scales", None) or [base]
    return TowerShape(
        layers=layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        patch=c.patch_size,
        image_size=base,
        cls_token=tower.has_cls_token,
        backward_layers=used,
        crop_scale=sum((s // base) ** 2 for s in scales),
    )


def batch_crops(images: Any) -> int:
    """Crops the tower encodes for a batch's ``images`` (None, [n, 3, S, S], or a list of [crops, 3, S, S])."""
    if images is None:
        return 0
    if isinstance(images, torch.Tensor):
        return int(images.shape[0]) if images.ndim == 4 else 1
    return sum(int(x.shape[0]) if x.ndim == 4 else 1 for x in images)


def sample_lengths(
    batch: dict[str, Any], image_tokens: Callable[[tuple[int, int]], int], max_length: int | None = None
) -> list[int]:
    """Merged length of every sample of a collated batch (text tokens + each image's feature tokens).

    Rows are cut into samples by ``seq_ids`` (packed rows) or the attention mask (one sample a row); each
    placeholder takes the next image of ``image_sizes`` in row order, as the merge does. A row is capped
    at ``max_length`` (the merge truncates it there).
    """
    ids = batch["input_ids"]  # [b, s]
    seq = batch.get("seq_ids")
    if seq is None:
        mask = batch.get("attention_mask")
        seq = torch.ones_like(ids) if mask is None else mask.long()  # [b, s]: 1 = the row's one sample
    sizes = list(batch.get("image_sizes") or [])
    is_image = ids == IMAGE_TOKEN_INDEX
    lengths: list[int] = []
    used = 0
    for row in range(ids.shape[0]):
        row_lengths = []
        for k in seq[row].unique().tolist():
            if k <= 0:
                continue
            mine = seq[row] == k
            n_img = int((mine & is_image[row]).sum())
            if used + n_img > len(sizes):
                raise ValueError(
                    f"batch row {row} has more image placeholders than the batch has image_sizes "
                    f"({len(sizes)}): the collator must list one (w, h) per image"
                )
            text = int(mine.sum()) - n_img
            row_lengths.append(text + sum(image_tokens(tuple(s)) for s in sizes[used : used + n_img]))
            used += n_img
        if max_length is not None and sum(row_lengths) > max_length:
            row_lengths[-1] -= sum(row_lengths) - max_length  # the merge cuts the row's end
        lengths += [n for n in row_lengths if n > 0]
    return lengths


def batch_flops(
    fm: FlopModel, batch: dict[str, Any], image_tokens: Callable, max_length: int | None
) -> Flops:
    """:func:`training_flops` of a collated batch; with ``labels``, the lm_head on the supervised rows."""
    crops = batch_crops(batch.get("images"))
    lengths = sample_lengths(batch, image_tokens, max_length)
    labels = batch.get("labels")
    if labels is None:
        supervised = None
    else:  # the targets the loss reads: labels[1:] of each row, neither ignored nor an image placeholder
        targets = labels[:, 1:]
        supervised = int(((targets != IGNORE_INDEX) & (targets != IMAGE_TOKEN_INDEX)).sum())
    return training_flops(fm, lengths, crops, image_free=crops == 0, supervised=supervised)
