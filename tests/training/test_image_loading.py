"""One image loader for every command: EXIF orientation, 16-bit and float images by value, transparency on
white, a pixel cap and non-regular files as one line, never a hang or a traceback."""

import os
import signal
import struct
import zlib

import numpy as np
import pytest

from PIL import Image

from vico.data import MAX_PIXELS, list_images, load_image, open_image
from vico.model import UserError


def test_16_bit_grayscale_is_scaled_by_value_not_clipped_to_white(tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)  # a 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(open_image(path))
    assert got.shape == (1, 4, 3)
    assert got[0, :, 0].tolist() == [0, 64, 128, 255]  # convert("RGB") gives [0, 255, 255, 255]


def test_float_images_are_scaled_by_value(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(path)
    assert np.asarray(open_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)  # left half red, right half black: 40 wide, 20 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    shown = np.asarray(open_image(path))
    assert shown.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 tall
    assert shown[5, 10, 0] > 200 and shown[35, 10, 0] < 60  # the red half is now on top


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :] = (10, 20, 30, 255)  # top half opaque, bottom half transparent black
    path = tmp_path / "cut-out.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = np.asarray(open_image(path))
    assert got[0, 0].tolist() == [10, 20, 30] and got[3, 3].tolist() == [255, 255, 255]


def _png_header_only(path, width, height):
    """A PNG that declares width x height but holds one tiny IDAT (what a decompression bomb looks like)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [15_000, 20_000])  # 225 MP (past PIL's limit), 400 MP
def test_a_huge_header_is_one_line_naming_the_file(tmp_path, side):
    path = tmp_path / "bomb.png"
    _png_header_only(path, side, side)
    assert side * side > MAX_PIXELS
    with pytest.raises(UserError, match=rf"image {path} is over the 179-megapixel limit \({side * side // 10**6} "
                                        r"megapixels by its header\); scale it down"):
        open_image(path)


def test_a_fifo_named_png_is_skipped_with_a_warning_not_read(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    signal.alarm(20)  # the old loader blocked here forever
    try:
        assert list_images(folder) == [folder / "a.png"]
        with pytest.raises(UserError, match="not a regular file"):
            load_image(folder / "b.png", 8)
    finally:
        signal.alarm(0)
    assert f"vico: warning: skipping {folder / 'b.png'}: not a regular file" in capsys.readouterr().err


def test_every_command_reads_images_through_the_one_loader(tmp_path):
    """eval's real and generated images and masks read 16-bit files like training does."""
    from vico.evaluation import read_mask
    from vico.metrics import read_image_files

    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[0, 40000]], dtype=np.uint16)).save(path)
    assert read_mask(path).tolist() == [[False, True]]
    assert read_image_files([path])[0][0, :, 0].tolist() == [0, 156]
