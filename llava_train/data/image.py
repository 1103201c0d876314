"""Image loading with validation, and the pad / square / anyres preprocessing of LLaVA.

As the original LLaVA's dataset: ``pad`` pads to a square of the processor's mean colour first,
anyres crops a grid, and every other ``image_aspect_ratio`` (``square`` included) hands the image to
the CLIP processor unchanged: shortest edge resized to S, then an S x S centre crop.

Shapes: S = the vision tower's input side (crop size); an anyres image becomes [1 + crops, 3, S, S]
(the resized whole image first, then the crops row by row); image sizes are PIL (width, height).
Normalisation goes through the tower's image processor (transformers', built from sizes: no hub access).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_train.data.errors import BadRecordError
from llava_train.model.anyres import is_anyres, parse_grid_pinpoints, select_best_resolution
from llava_train.model.vision_tower import clip_image_processor

# the processor of a CLIP tower of side S; a built tower gives its own (``tower.image_processor()``)
build_image_processor = clip_image_processor

Colour = tuple[int, int, int]


def processor_crop_size(image_processor: Any) -> int:
    """S, the processor's output side."""
    crop = image_processor.crop_size
    if isinstance(crop, int):
        return crop
    return int(crop["height"] if isinstance(crop, dict) else crop.height)  # dict or transformers SizeDict


def mean_colour(image_processor: Any) -> Colour:
    """The processor's mean as an RGB byte colour (pads normalise to zero)."""
    # Truncated, not rounded: (122, 116, 104) for CLIP, as the original LLaVA and transformers pad.
    return tuple(int(m * 255) for m in image_processor.image_mean)  # type: ignore[return-value]


def load_image(
    path: str | os.PathLike | bytes | dict, max_pixels: int = 64_000_000, background: Colour = (255, 255, 255)
) -> Image.Image:
    """Open, validate and convert an image to RGB.

    Raises BadRecordError: missing_image (no file), unreadable_image (empty, truncated, corrupt,
    zero-sized), image_too_large (more than ``max_pixels`` pixels: decompression-bomb guard).
    Transparent images (RGBA, LA, palette with transparency) are composited on ``background``;
    CMYK, grayscale and palette images are converted to RGB.
    """
    return to_rgb(_open_checked(*_image_source(path), max_pixels), background)


def read_image_size(path: str | os.PathLike | bytes | dict, max_pixels: int = 64_000_000) -> tuple[int, int]:
    """(width, height) from the image header, with :func:`load_image`'s checks but no decoding.

    PIL's ``verify`` catches truncated or corrupt PNG data; a JPEG whose data is corrupt past a valid
    header is found only when it is loaded.
    """
    image = _open_checked(*_image_source(path), max_pixels, decode=False)
    size = image.size
    image.close()
    return size


def _image_source(path: str | os.PathLike | bytes | dict) -> tuple[Path | io.BytesIO, str]:
    """(what PIL opens, the name errors give) of a path, raw bytes or an undecoded HF Image feature."""
    if isinstance(path, dict):  # an undecoded HF Image feature: {"bytes": ..., "path": ...}
        path = path.get("bytes") or path.get("path") or b""
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise BadRecordError("unreadable_image", "empty image bytes")
        return io.BytesIO(path), "<bytes>"
    path = Path(path)
    if not path.is_file():
        raise BadRecordError("missing_image", f"no file at {str(path)!r}")
    if path.stat().st_size == 0:
        raise BadRecordError("unreadable_image", f"{str(path)!r} is an empty file")
    return path, str(path)


def _open_checked(path: Path | io.BytesIO, name: str, max_pixels: int, decode: bool = True) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # max_pixels is the limit below PIL's hard one (DecompressionBombError at 2 x MAX_IMAGE_PIXELS)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # lazy: reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise BadRecordError("image_too_large", f"{name!r} is {width}x{height} > {max_pixels} pixels")
            if width == 0 or height == 0:
                raise BadRecordError("unreadable_image", f"{name!r} has zero size {width}x{height}")
            if decode:
                image.load()  # decodes: truncated / corrupt data fails here
            else:
                image.verify()  # integrity without decoding (PNG chunk CRCs; a no-op for JPEG)
    except Image.DecompressionBombError as err:
        raise BadRecordError(
            "image_too_large",
            f"{name!r}: beyond PIL's own limit, which max_image_pixels cannot raise ({err})",
        ) from err
    except BadRecordError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise BadRecordError("unreadable_image", f"{name!r}: {err}") from err
    return image


def to_rgb(image: Image.Image, background: Colour = (255, 255, 255)) -> Image.Image:
    """RGB copy of ``image``; transparency is composited on ``background``."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = image.point(lambda v: v / 256).convert("L") if image.mode != "F" else image.convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image


def expand2square(image: Image.Image, background: Colour) -> Image.Image:
    """Pad the short side symmetrically to a square of ``background`` colour (LLaVA-1.5 'pad')."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_pad(image: Image.Image, target: tuple[int, int], fill: Colour = (0, 0, 0)) -> Image.Image:
    """Resize keeping the aspect ratio to fit ``target`` (w, h), centred on a ``fill`` canvas.

    Black fill and ceil rounding as the original LLaVA-NeXT, so pretrained anyres checkpoints see the
    inputs they were trained on; the model's unpad removes this padding again.
    """
    import math

    tw, th = target
    ow, oh = image.size
    if tw / ow < th / oh:
        nw, nh = tw, min(math.ceil(oh * tw / ow), th)
    else:
        nw, nh = min(math.ceil(ow * th / oh), tw), th
    canvas = Image.new("RGB", (tw, th), fill)
    canvas.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def divide_to_crops(image: Image.Image, crop: int) -> list[Image.Image]:
    """Square crops of side ``crop``, row by row (top-left first)."""
    width, height = image.size
    return [
        image.crop((x, y, x + crop, y + crop)) for y in range(0, height, crop) for x in range(0, width, crop)
    ]


def _normalize(images: list[Image.Image], image_processor: Any) -> torch.Tensor:
    """[n, 3, S, S] float tensor through the CLIP processor."""
    out = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(out, dtype=torch.float32)


def process_anyres_image(
    image: Image.Image, image_processor: Any, grid_pinpoints: str | Sequence[Sequence[int]]
) -> torch.Tensor:
    """[1 + crops, 3, S, S]: the whole image resized to S x S, then the crops of its best canvas."""
    crop = processor_crop_size(image_processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints, crop))
    crops = divide_to_crops(resize_and_pad(image, best), crop)
    base = image.resize((crop, crop))
    return _normalize([base, *crops], image_processor)


def process_images(
    images: Sequence[Image.Image],
    image_processor: Any,
    image_aspect_ratio: str = "pad",
    grid_pinpoints: str | Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, int]]]:
    """Pixel tensors and (w, h) sizes of RGB images.

    pad: expand2square with the processor's mean colour -> [n, 3, S, S]; anyres / anyres_max_N: list
    of [1 + crops, 3, S, S] (needs ``grid_pinpoints``); any other value (square, as the original LLaVA):
    the processor's shortest-edge resize to S and centre crop -> [n, 3, S, S].
    """
    sizes = [tuple(im.size) for im in images]
    if is_anyres(image_aspect_ratio):
        if grid_pinpoints is None:
            raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} needs image_grid_pinpoints")
        return [process_anyres_image(im, image_processor, grid_pinpoints) for im in images], sizes
    crop = processor_crop_size(image_processor)
    if image_aspect_ratio == "pad":
        prepared = [expand2square(im, mean_colour(image_processor)) for im in images]
    else:
        prepared = list(images)
    if not prepared:
        return torch.empty(0, 3, crop, crop), []
    return _normalize(prepared, image_processor), sizes  # [n, 3, S, S]
