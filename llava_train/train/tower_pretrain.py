"""Pretrain a random vision tower on image-caption pairs, before LLaVA's stage 1.

LLaVA starts from a pretrained CLIP tower. Where none can be loaded (the offline demo builds its
tower from a config), this step stands in for CLIP's image-text pretraining on the training images
only: the distinct captions are the classes (CLIP's zero-shot classifier with a fixed caption set),
and a linear classifier reads the tower's *selected* features (the layer and patches LLaVA's
projector will see), averaged over patches. The classifier is thrown away afterwards; only the tower
keeps its weights. A ViT has no translation prior and small data sets overfit it quickly, so every
image gets a random rotation, scale and shift at every step. ``token_loss`` adds the same
classification from every token alone, so that each token an LLM attends to carries the class (a
digit read from any of its crop's tokens).

    pixels, captions = load_caption_pairs("data/demo/tower_pairs.json", "data/demo/images", processor)
    report = pretrain_vision_tower(model.get_vision_tower(), pixels, captions, TowerPretrainConfig())
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_train.data.dataset import resolve_image_path
from llava_train.data.errors import BadRecordError
from llava_train.data.image import load_image

log = logging.getLogger(__name__)


@dataclass
class TowerPretrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    max_rotate: float = 0.2  # radians, uniform in [-max, max]
    max_scale: float = 0.1  # relative zoom, uniform in [1 - max, 1 + max]
    max_shift: float = 0.15  # fraction of the half side, uniform in [-max, max] on each axis
    token_loss: float = 0.0  # weight of the same classification from every token alone
    val_share: float = 0.05  # training pairs held back to report generalisation (0: none)
    seed: int = 0


def load_caption_pairs(path: str | Path, image_folder: str | Path, image_processor: Any) -> tuple:
    """(pixels [n, 3, S, S], captions) of a JSON list of ``{"image": rel_path, "caption": str}``.

    Images resolve under ``image_folder`` (paths may not escape it) and go through ``image_processor``
    (resize, centre crop, normalise), as a square image does in the LLaVA data pipeline.
    """
    records = json.loads(Path(path).read_text())
    images, captions = [], []
    for k, record in enumerate(records):
        if not isinstance(record, dict) or not record.get("image") or not record.get("caption"):
            raise ValueError(
                f"{path}: record {k} needs non-empty 'image' and 'caption' fields, got {record!r}"
            )
        try:
            images.append(load_image(resolve_image_path(record["image"], str(image_folder))))
        except BadRecordError as err:
            raise ValueError(f"{path}: record {k} ({record['image']!r}): {err}") from err
        captions.append(str(record["caption"]))
    if not images:
        raise ValueError(f"{path} holds no image-caption pairs")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]  # [n, 3, S, S]
    return pixels, captions


def augment(pixels: torch.Tensor, cfg: TowerPretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """A random rotation, zoom and shift per image; edges are replicated (no new borders)."""
    n = pixels.shape[0]

    def uniform(scale: float, *shape: int) -> torch.Tensor:
        return (torch.rand(n, *shape, generator=generator) * 2 - 1) * scale

    angle = uniform(cfg.max_rotate)
    zoom = 1 + uniform(cfg.max_scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1
    )  # [n, 2, 2]: output -> input coordinates
    theta = torch.cat([theta, uniform(cfg.max_shift, 2, 1)], -1)  # [n, 2, 3]
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def _loss(
    tower: nn.Module, head: nn.Linear, pixels: torch.Tensor, labels: torch.Tensor, token_loss: float
) -> torch.Tensor:
    tokens = tower(pixels)  # [b, t, d]
    loss = F.cross_entropy(head(tokens.mean(1)), labels)
    if token_loss:
        logits = head(tokens)  # [b, t, classes]
        loss = loss + token_loss * F.cross_entropy(
            logits.flatten(0, 1), labels.repeat_interleave(tokens.shape[1])
        )
    return loss


@torch.no_grad()
def _accuracy(
    tower: nn.Module, head: nn.Linear, pixels: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """(accuracy of the token-averaged features, mean accuracy of each token alone), in eval mode.

    One tower pass serves both: the head is linear, so the averaged features' logits are the mean of
    the tokens' logits.
    """
    was_training = tower.training
    tower.eval()
    pooled = token = 0.0
    for x, y in zip(pixels.split(512), labels.split(512), strict=True):
        logits = head(tower(x))  # [b, t, classes]
        pooled += (logits.mean(1).argmax(-1) == y).sum().item()
        token += (logits.argmax(-1) == y[:, None]).float().mean(1).sum().item()
    tower.train(was_training)
    n = max(1, len(labels))
    return pooled / n, token / n


def pretrain_vision_tower(
    tower: nn.Module, pixels: torch.Tensor, captions: list[str], cfg: TowerPretrainConfig
) -> dict:
    """Train ``tower`` in place to tell the distinct ``captions`` apart; returns a report.

    ``tower`` maps [n, 3, S, S] to selected features [n, tokens, d] (a :class:`CLIPVisionTower`).
    The report has the classes, the loss per epoch, and the accuracy on the training pairs and on
    the ``val_share`` of pairs held back (not trained on).
    """
    if len(captions) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    classes = sorted(set(captions))
    if len(classes) < 2:
        raise ValueError(f"tower pretraining needs at least 2 distinct captions, got {classes}")
    labels = torch.tensor([classes.index(c) for c in captions])
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(labels), generator=generator)
    n_val = int(len(labels) * cfg.val_share)
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise ValueError(f"no training pairs left after holding back val_share={cfg.val_share}")

    param = next(tower.parameters())
    pixels = pixels.to(device=param.device, dtype=param.dtype)
    labels = labels.to(param.device)
    torch.manual_seed(cfg.seed)
    head = nn.Linear(tower.hidden_size, len(classes)).to(device=param.device, dtype=param.dtype)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(total * cfg.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    tower.train()
    losses, start = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        shuffled = train[torch.randperm(len(train), generator=generator)]
        total_loss = 0.0
        for batch in shuffled.split(cfg.batch_size):
            x = augment(pixels[batch], cfg, generator)
            loss = _loss(tower, head, x, labels[batch], cfg.token_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        losses.append(total_loss / len(train))
        log.info("tower pretraining epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    val_accuracy, val_token_accuracy = (
        _accuracy(tower, head, pixels[val], labels[val]) if n_val else (None, None)
    )
    report = {
        "classes": classes,
        "epochs": cfg.epochs,
        "loss": losses,
        "train_accuracy": _accuracy(tower, head, pixels[train], labels[train])[0],
        "val_accuracy": val_accuracy,
        "val_token_accuracy": val_token_accuracy,
        "n_train": len(train),
        "n_val": n_val,
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("tower pretraining: train accuracy %.4f, held-back accuracy %s (%d pairs), %.0f s",
             report["train_accuracy"], report["val_accuracy"], n_val, report["seconds"])  # fmt: skip
    return report
