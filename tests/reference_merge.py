"""Plain-loop reference of the original LLaVA multimodal merge (seed document, section 3).

Written for clarity, not speed: one Python step per row, per text segment and per image, as the
original ``prepare_inputs_labels_for_multimodal``. tests/test_merge.py checks the vectorised merge
against it; benchmarks/bench_merge.py times both. Only the geometry helpers of anyres.py are shared
(they are checked against transformers in tests/test_anyres.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model.anyres import anyres_max_patches, get_anyres_image_grid_shape, unpad_image


def reference_image_features(model, images, image_sizes):
    """Per-image features, as the original's image branch (stacked -> flat; list -> merge type)."""
    if not isinstance(images, list) and images.ndim == 4:
        return list(model.encode_images(images))
    images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
    features = model.encode_images(torch.cat(images, dim=0))
    features = torch.split(features, [x.shape[0] for x in images], dim=0)
    config = model.config
    merge_type = config.mm_patch_merge_type
    if merge_type == "flat":
        return [x.flatten(0, 1) for x in features]
    newline = model.get_model().image_newline if "unpad" in merge_type else None
    out = []
    for idx, feature in enumerate(features):
        if feature.shape[0] == 1:
            feature = feature[0]
            if newline is not None:
                feature = torch.cat((feature, newline[None]), dim=0)
            out.append(feature)
            continue
        base, rest = feature[0], feature[1:]
        side = model.get_vision_tower().num_patches_per_side
        num_w, num_h = get_anyres_image_grid_shape(
            image_sizes[idx], config.image_grid_pinpoints, model.get_vision_tower().config.image_size
        )
        rest = rest.view(num_h, num_w, side, side, -1)
        if newline is not None:
            rest = rest.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            rest = unpad_image(rest, image_sizes[idx])
            max_patches = anyres_max_patches(config.image_aspect_ratio)
            if max_patches is not None:
                c, h, w = rest.shape
                times = math.sqrt(h * w / (max_patches * side**2))
                if times > 1.1:
                    rest = F.interpolate(rest[None], [int(h // times), int(w // times)], mode="bilinear")[0]
            rest = torch.cat((rest, newline[:, None, None].expand(*rest.shape[:-1], 1)), dim=-1)
            rest = rest.flatten(1, 2).transpose(0, 1)
        else:
            rest = rest.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        out.append(torch.cat((base, rest), dim=0))
    return out


def reference_merge(model, input_ids, position_ids, attention_mask, labels, images, image_sizes):
    """Loop version of ``prepare_inputs_labels_for_multimodal`` (same return tuple)."""
    image_features = reference_image_features(model, images, image_sizes)
    embed = model.get_model().embed_tokens
    _labels, _position_ids, _attention_mask = labels, position_ids, attention_mask
    attention_mask = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    )
    if position_ids is None:
        position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long)
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    input_ids = [ids[mask] for ids, mask in zip(input_ids, attention_mask)]
    labels = [lab[mask] for lab, mask in zip(labels, attention_mask)]
    num_placeholders = sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in input_ids)
    dummies = len(image_features) != num_placeholders  # one dummy image per text-only row

    new_embeds, new_labels, image_idx = [], [], 0
    for row, ids in enumerate(input_ids):
        num_images = int((ids == IMAGE_TOKEN_INDEX).sum())
        if num_images == 0:
            new_embeds.append(embed(ids))
            new_labels.append(labels[row])
            image_idx += 1 if dummies else 0
            continue
        cuts = [-1] + torch.where(ids == IMAGE_TOKEN_INDEX)[0].tolist() + [ids.shape[0]]
        pieces, piece_labels = [], []
        for i in range(len(cuts) - 1):
            segment = ids[cuts[i] + 1 : cuts[i + 1]]
            pieces.append(embed(segment))
            piece_labels.append(labels[row][cuts[i] + 1 : cuts[i + 1]])
            if i < num_images:
                feature = image_features[image_idx]
                image_idx += 1
                pieces.append(feature)
                piece_labels.append(torch.full((feature.shape[0],), IGNORE_INDEX, dtype=labels[row].dtype))
        new_embeds.append(torch.cat(pieces))
        new_labels.append(torch.cat(piece_labels))

    max_length = model.config.tokenizer_model_max_length
    if max_length is not None:
        new_embeds = [x[:max_length] for x in new_embeds]
        new_labels = [x[:max_length] for x in new_labels]
    max_len = max(x.shape[0] for x in new_embeds)
    batch = len(new_embeds)
    padded = []
    labels_padded = torch.full((batch, max_len), IGNORE_INDEX, dtype=new_labels[0].dtype)
    mask = torch.zeros((batch, max_len), dtype=attention_mask.dtype)
    positions = torch.zeros((batch, max_len), dtype=position_ids.dtype)
    for i, (cur_embed, cur_labels) in enumerate(zip(new_embeds, new_labels)):
        cur_len = cur_embed.shape[0]
        pad = torch.zeros((max_len - cur_len, cur_embed.shape[1]), dtype=cur_embed.dtype)
        if model.config.tokenizer_padding_side == "left":
            padded.append(torch.cat((pad, cur_embed)))
            if cur_len > 0:
                labels_padded[i, -cur_len:] = cur_labels
                mask[i, -cur_len:] = True
                positions[i, -cur_len:] = torch.arange(0, cur_len, dtype=position_ids.dtype)
        else:
            padded.append(torch.cat((cur_embed, pad)))
            if cur_len > 0:
                labels_padded[i, :cur_len] = cur_labels
                mask[i, :cur_len] = True
                positions[i, :cur_len] = torch.arange(0, cur_len, dtype=position_ids.dtype)
    embeds = torch.stack(padded)
    out_labels = None if _labels is None else labels_padded
    out_mask = None if _attention_mask is None else mask.to(dtype=_attention_mask.dtype)
    out_positions = None if _position_ids is None else positions
    return None, out_positions, out_mask, None, embeds, out_labels
