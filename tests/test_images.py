"""Image decoding: every colour mode, EXIF orientation, huge images, broken files (made by the tests)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from semires.errors import SemiresError
from semires.images import MAX_PIXELS, read_image, read_rgb


def picture(h: int = 24, w: int = 36) -> np.ndarray:
    """An ``h x w`` RGB picture with no symmetry: a gradient and a red block in the top-left corner."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=-1).astype(np.uint8)
    rgb[: h // 3, : w // 4] = (255, 0, 0)
    return rgb


def both(path) -> tuple[np.ndarray, np.ndarray]:
    """What the dataset reader and the user-image reader make of ``path``."""
    stored, _ = read_rgb(path)
    return stored, read_image(path).rgb


def test_rgb_png_reads_exactly(tmp_path):
    rgb = picture()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    stored, shown = both(tmp_path / "a.png")
    assert stored.dtype == np.uint8 and np.array_equal(stored, rgb) and np.array_equal(shown, rgb)
    assert stored.flags.writeable


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_user_images_upright_and_leaves_dataset_images_stored(tmp_path, orientation):
    """A phone photo: pixels stored sideways plus an EXIF tag that says how to show them."""
    stored = picture(20, 32)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"  # PNG keeps the pixels exact; its eXIf chunk holds the tag
    Image.fromarray(stored).save(path, exif=exif)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    dataset, _ = read_rgb(path)
    assert np.array_equal(dataset, stored)  # annotations are made on the stored grid
    decoded = read_image(path)
    assert np.array_equal(decoded.rgb, upright)
    assert decoded.size == upright.shape[:2] == ((32, 20) if orientation >= 5 else (20, 32))
    assert np.array_equal(read_image(path, exif=False).rgb, stored)


def test_exif_rotated_jpeg(tmp_path):
    stored = picture(30, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    decoded = read_image(tmp_path / "phone.jpg")
    assert decoded.size == (60, 30)
    # The red block, top-left when stored, is top-right when shown.
    assert decoded.rgb[2, -3, 0] > 200 and decoded.rgb[2, -3, 1] < 60
    assert read_rgb(tmp_path / "phone.jpg")[0].shape == (30, 60, 3)


def test_greyscale_and_palette(tmp_path):
    grey = picture()[..., 1]
    Image.fromarray(grey).save(tmp_path / "l.png")
    stored, shown = both(tmp_path / "l.png")
    assert np.array_equal(stored, np.repeat(grey[..., None], 3, 2)) and np.array_equal(shown, stored)
    pal = Image.fromarray(picture()).quantize(16)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(read_rgb(tmp_path / "p.png")[0], np.asarray(pal.convert("RGB")))


def test_transparency_lies_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :2, 3] = 0  # transparent: white
    rgba[:, 2:4, 3] = 255  # opaque: its colour
    rgba[:, 4:, 3] = 128  # half: between
    Image.fromarray(rgba).save(tmp_path / "a.png")
    stored, shown = both(tmp_path / "a.png")
    assert (stored[:, :2] == 255).all() and (stored[:, 2:4] == (10, 20, 30)).all()
    assert np.allclose(stored[:, 4:], [(10 + 255) / 2, (20 + 255) / 2, (30 + 255) / 2], atol=2)
    assert np.array_equal(shown, stored)
    # A palette image with one transparent index, and a greyscale + alpha one
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0])
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "pt.png", transparency=0)
    rgb = read_rgb(tmp_path / "pt.png")[0]
    assert tuple(rgb[0, 0]) == (200, 0, 0) and (rgb[1:] == 255).all()
    Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1)).save(
        tmp_path / "la.png"
    )
    assert (read_rgb(tmp_path / "la.png")[0] == 255).all()


def test_16_bit_greyscale_is_scaled_not_white(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(3, 0)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # really a 16-bit file
    stored, shown = both(tmp_path / "g16.png")
    assert stored[0, :, 0].tolist() == [0, 1, 128, 255] and np.array_equal(shown, stored)
    # A dark 16-bit image stays dark (Pillow's own conversion would clip it to white).
    dark = np.full((8, 8), 200, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert (read_image(tmp_path / "dark.png").rgb <= 1).all()


def test_float_and_32_bit_images(tmp_path):
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    f.save(tmp_path / "f.tiff")
    assert read_rgb(tmp_path / "f.tiff")[0][0, :, 0].tolist() == [0, 128, 255]
    i = Image.fromarray(np.array([[0, 100, 255]], np.int32))
    i.save(tmp_path / "i.tiff")
    assert read_rgb(tmp_path / "i.tiff")[0][0, :, 0].tolist() == [0, 100, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    stored, shown = both(tmp_path / "cmyk.jpg")
    assert np.allclose(stored[8, 8], (255, 0, 0), atol=8) and np.array_equal(shown, stored)


def test_huge_jpeg_decodes_reduced_with_its_full_size(tmp_path):
    """4000 x 3000: decoded at 1/2 scale by JPEG's DCT (never the full 36 MB), size still full."""
    big = np.zeros((3000, 4000), np.uint8)
    big[:, 2000:] = 255
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    decoded = read_image(tmp_path / "big.jpg", max_side=1024)
    assert decoded.size == (3000, 4000) and decoded.reduced
    assert decoded.rgb.shape == (1500, 2000, 3)  # the longer side in [max_side, 2 x max_side)
    assert decoded.rgb[:, :990].max() < 30 and decoded.rgb[:, 1010:].min() > 225
    # Below twice max_side nothing is reduced
    assert not read_image(tmp_path / "big.jpg", max_side=2048).reduced


def test_huge_png_is_reduced_by_a_whole_factor(tmp_path):
    Image.fromarray(picture(500, 2100)).save(tmp_path / "wide.png")
    decoded = read_image(tmp_path / "wide.png", max_side=1000)
    assert decoded.size == (500, 2100) and decoded.rgb.shape == (250, 1050, 3)


def bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w x h`` pixels, with almost no data: what a bomb looks like
    before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_one_clear_message(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(20000, 20000))
    for read, fix in (
        (read_rgb, "replace the file and rerun"),
        (read_image, "raise the limit (semires predict"),
    ):
        with pytest.raises(SemiresError) as e:
            read(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: image of 20000x20000 = 400 M pixels, above the limit of 179 M")
        assert "decompression bombs" in msg and fix in msg
    # The limit is ours to set: a small image under a tiny limit is refused too
    Image.fromarray(picture()).save(tmp_path / "a.png")
    with pytest.raises(SemiresError, match="above the limit of 0 M"):
        read_image(tmp_path / "a.png", max_pixels=100)
    assert MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # Pillow's hard limit, as default


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes), not an image"),
        (lambda p: p.write_text("not an image at all"), "not an image file Pillow can read (unknown format)"),
        (lambda p: p.mkdir(), "a folder, not an image"),
        (lambda p: None, "image not found"),
    ],
    ids=["empty", "text", "folder", "missing"],
)
def test_unreadable_files_name_the_file(tmp_path, make, says):
    path = tmp_path / "x.jpg"
    make(path)
    for read in (read_rgb, read_image):
        with pytest.raises(SemiresError) as e:
            read(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and says in msg, msg
        assert "BytesIO" not in msg and "\n" not in msg


def test_truncated_jpeg(tmp_path):
    Image.fromarray(picture(64, 64)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    for read in (read_rgb, read_image):
        with pytest.raises(
            SemiresError, match=r"t.jpg: not a readable image \((image file is truncated|Truncated File Read)"
        ):
            read(tmp_path / "t.jpg")


def test_a_pil_image_in_memory(tmp_path):
    im = Image.fromarray(picture()).convert("LA")
    decoded = read_image(im)
    assert decoded.size == (24, 36) and decoded.rgb.shape == (24, 36, 3)


def test_a_large_pil_image_is_reduced_without_changing_the_callers_image(tmp_path):
    Image.fromarray(picture(600, 2100)).save(tmp_path / "wide.jpg")
    with Image.open(tmp_path / "wide.jpg") as im:
        decoded = read_image(im, max_side=1000)
        assert im.size == (2100, 600)  # not drafted in place
        assert decoded.size == (600, 2100) and decoded.rgb.shape == (300, 1050, 3)
