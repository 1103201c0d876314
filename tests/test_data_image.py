"""Image loading (validation and mode conversion) and pad / square / anyres preprocessing."""

import io

import pytest
import torch
from PIL import Image

from llava_train.data.errors import BadRecordError
from llava_train.data.image import (
    build_image_processor,
    divide_to_crops,
    expand2square,
    load_image,
    mean_colour,
    process_images,
    resize_and_pad,
)

PINPOINTS = [[56, 56], [112, 56], [56, 112], [112, 112]]


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(56)


def _save(tmp_path, image, name="x.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "colour"), [("L", 90), ("CMYK", (0, 255, 0, 0)), ("P", 3), ("RGB", (1, 2, 3)), ("I;16", 30000)]
)
def test_modes_become_rgb(tmp_path, mode, colour):
    name = "x.jpg" if mode == "CMYK" else "x.png"
    image = load_image(_save(tmp_path, Image.new(mode, (10, 6), colour), name))
    assert image.mode == "RGB" and image.size == (10, 6)


def test_transparency_composited_on_background(tmp_path):
    path = _save(tmp_path, Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(path, background=(10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert load_image(_save(tmp_path, palette, "p.png", transparency=0)).getpixel((1, 1)) == (255, 255, 255)


def test_bad_files(tmp_path):
    good = _save(tmp_path, Image.new("RGB", (300, 300)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:80])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name, kind in [
        ("nope.png", "missing_image"),
        ("empty.png", "unreadable_image"),
        ("trunc.png", "unreadable_image"),
        ("junk.png", "unreadable_image"),
    ]:
        with pytest.raises(BadRecordError) as info:
            load_image(tmp_path / name)
        assert info.value.kind == kind
    with pytest.raises(BadRecordError) as info:
        load_image(good, max_pixels=300 * 300 - 1)
    assert info.value.kind == "image_too_large"
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (5, 5)


def test_expand2square_pads_with_mean(processor):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    square = expand2square(image, mean_colour(processor))
    assert square.size == (20, 20)
    assert square.getpixel((0, 0)) == mean_colour(processor) and square.getpixel((10, 10)) == (255, 0, 0)
    pixels, sizes = process_images([image], processor, "pad")
    assert pixels.shape == (1, 3, 56, 56) and sizes == [(20, 10)]
    assert pixels[:, :, 0, 0].abs().max() < 0.02  # the padding normalises to ~0


def test_square_is_shortest_edge_resize_and_centre_crop(processor):
    """As the original LLaVA: the CLIP processor's resize (short side to S) + centre crop, no stretch."""
    image = Image.new("RGB", (30, 90), (255, 0, 0))
    image.paste((0, 0, 255), (0, 30, 30, 60))  # the middle third blue: all the crop keeps
    pixels, sizes = process_images([image] * 2, processor, "square")
    assert pixels.shape == (2, 3, 56, 56) and sizes == [(30, 90)] * 2
    blue = processor(images=[Image.new("RGB", (56, 56), (0, 0, 255))], return_tensors="pt")["pixel_values"]
    inner = (slice(None), slice(4, -4))  # bicubic blends the rows next to the crop edges
    assert torch.allclose(pixels[0][inner], torch.as_tensor(blue[0])[inner], atol=0.05)  # stretched: red rows
    assert torch.equal(process_images([image], processor, "crop")[0][0], pixels[0])  # any other value


def test_anyres_crops_order_and_padding(processor):
    image = Image.new("RGB", (100, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 50, 40))  # left half red
    canvas = resize_and_pad(image, (112, 56))
    assert canvas.size == (112, 56) and canvas.getpixel((56, 1)) == (0, 0, 0)  # letterbox is black
    crops = divide_to_crops(canvas, 56)
    assert len(crops) == 2 and crops[0].getpixel((28, 28))[0] > 200 and crops[1].getpixel((28, 28))[2] > 200
    pixels, sizes = process_images([image], processor, "anyres", PINPOINTS)
    assert isinstance(pixels, list) and pixels[0].shape == (3, 3, 56, 56) and sizes == [(100, 40)]
    grid = process_images([Image.new("RGB", (120, 130))], processor, "anyres_max_4", "(1x1),...,(2x2)")[0]
    assert grid[0].shape == (5, 3, 56, 56)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        process_images([image], processor, "anyres")
    assert torch.is_floating_point(pixels[0])
