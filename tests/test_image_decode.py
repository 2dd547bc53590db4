"""decode_image: format allowlist by sniffing, header-first size limits, EXIF, alpha, odd modes, fixed errors."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib

import numpy as np
import pydantic
import pytest
from PIL import Image

from dvd_serve.common.errors import InvalidRequestError, PayloadTooLargeError
from dvd_serve.vision_worker.image_decode import (
    BOMB_MESSAGE,
    UNREADABLE_MESSAGE,
    UNSUPPORTED_MODE_MESSAGE,
    DecodeLimits,
    decode_image,
    to_rgb,
)

DEFAULT_LIMITS = DecodeLimits()


def _encode(image: Image.Image, fmt: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims `width x height` RGB pixels and whose data holds almost nothing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _psd_1x1() -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 1, 1, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + b"\x10\x20\x30"


def _fits_1x1() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    1", "NAXIS2  =                    1", "END"]  # fmt: skip
    return "".join(card.ljust(80) for card in cards).ljust(2880).encode() + b"\x7f".ljust(2880, b"\0")


def _vllm_rgb(image: Image.Image) -> np.ndarray:
    from vllm.multimodal.image import convert_image_mode

    return np.asarray(convert_image_mode(image, "RGB"))


# ---- format allowlist ------------------------------------------------------------------------------------------


FORBIDDEN_PAYLOADS = {
    "EPS": lambda: _encode(Image.new("RGB", (4, 4)), "EPS"),
    "JPEG2000": lambda: _encode(Image.new("RGB", (4, 4)), "JPEG2000"),
    "PSD": _psd_1x1,
    "FITS": _fits_1x1,
}


@pytest.mark.parametrize("fmt", sorted(FORBIDDEN_PAYLOADS))
def test_dangerous_formats_are_refused_without_their_plugin_running(fmt, monkeypatch):
    payload = FORBIDDEN_PAYLOADS[fmt]()
    assert Image.open(io.BytesIO(payload)).format == fmt  # a real payload of that format
    consulted = []
    factory, accept = Image.OPEN[fmt]
    recording_factory = lambda *args: consulted.append("open") or factory(*args)  # noqa: E731
    recording_accept = lambda prefix: consulted.append("sniff") or accept(prefix)  # noqa: E731
    monkeypatch.setitem(Image.OPEN, fmt, (recording_factory, recording_accept))
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(payload, DEFAULT_LIMITS)
    assert raised.value.http_status == 400
    assert raised.value.message.startswith("The image format is not supported")
    assert consulted == []


def test_pdf_is_refused():
    with pytest.raises(InvalidRequestError):
        decode_image(_encode(Image.new("RGB", (4, 4)), "PDF"), DEFAULT_LIMITS)


@pytest.mark.parametrize("fmt", ["EPS", "PSD", "PDF", "JPEG2000", "FITS", "eps"])
def test_dangerous_formats_cannot_be_configured(fmt):
    with pytest.raises(pydantic.ValidationError):
        DecodeLimits(allowed_formats=("PNG", fmt))


def test_unknown_format_names_cannot_be_configured():
    with pytest.raises(pydantic.ValidationError):
        DecodeLimits(allowed_formats=("PNG", "HEIC-NOT-A-PILLOW-FORMAT"))


def test_png_bytes_labelled_jpeg_are_decoded_by_content():
    png = _encode(Image.new("RGB", (5, 3), (1, 2, 3)), "PNG")
    image = decode_image(png, DecodeLimits(allowed_formats=("JPEG", "PNG")))
    assert image.size == (5, 3) and image.getpixel((4, 2)) == (1, 2, 3)
    with pytest.raises(InvalidRequestError):  # the bytes decide, so a JPEG-only allowlist refuses them
        decode_image(png, DecodeLimits(allowed_formats=("JPEG",)))


def test_allowlist_is_configurable():
    ppm = _encode(Image.new("RGB", (2, 2), (9, 8, 7)), "PPM")
    with pytest.raises(InvalidRequestError):
        decode_image(ppm, DEFAULT_LIMITS)
    assert decode_image(ppm, DecodeLimits(allowed_formats=("PNG", "PPM"))).getpixel((1, 1)) == (9, 8, 7)
    bmp = _encode(Image.new("RGB", (2, 2)), "BMP")
    assert decode_image(bmp, DEFAULT_LIMITS).size == (2, 2)
    with pytest.raises(InvalidRequestError):
        decode_image(bmp, DecodeLimits(allowed_formats=("PNG",)))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_default_formats_decode(fmt):
    image = decode_image(_encode(Image.new("RGB", (6, 4), (200, 100, 50)), fmt), DEFAULT_LIMITS)
    assert image.mode == "RGB" and image.size == (6, 4)


# ---- size limits -------------------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_the_header_quickly_with_flat_memory():
    bomb = _png_declaring(40_000, 40_000)  # 1.6 gigapixels = 4.8 GB of RGB if decoded
    assert len(bomb) < 200
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(PayloadTooLargeError) as raised:
        decode_image(bomb, DEFAULT_LIMITS)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib < 64 * 1024
    assert raised.value.http_status == 413


def test_oversized_header_is_refused_before_decoding():
    # 9000x9000 passes Pillow's own guard; only our header check can refuse it. Its pixel data is missing, so
    # reaching the decoder would give "could not be decoded" (400), not "too large" (413).
    with pytest.raises(PayloadTooLargeError) as raised:
        decode_image(_png_declaring(9000, 9000), DEFAULT_LIMITS)
    assert "pixels" in raised.value.message
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(_png_declaring(90, 90), DEFAULT_LIMITS)
    assert raised.value.message == UNREADABLE_MESSAGE


@pytest.mark.parametrize(
    "limits,size,accepted",
    [
        (DecodeLimits(max_pixels=120), (12, 10), True),
        (DecodeLimits(max_pixels=120), (120, 1), True),
        (DecodeLimits(max_pixels=120), (121, 1), False),
        (DecodeLimits(max_pixels=120), (11, 11), False),
        (DecodeLimits(max_side=50), (1, 50), True),
        (DecodeLimits(max_side=50), (1, 51), False),
        (DecodeLimits(max_side=50), (51, 1), False),
    ],
)
def test_pixel_and_side_limit_boundaries_are_exact(limits, size, accepted):
    png = _encode(Image.new("RGB", size), "PNG")
    if accepted:
        assert decode_image(png, limits).size == size
    else:
        with pytest.raises(PayloadTooLargeError):
            decode_image(png, limits)


def test_byte_limit_boundary_is_exact():
    png = _encode(Image.new("RGB", (3, 3)), "PNG")
    assert decode_image(png, DecodeLimits(max_bytes=len(png))).size == (3, 3)
    with pytest.raises(PayloadTooLargeError):
        decode_image(png, DecodeLimits(max_bytes=len(png) - 1))


def test_pillow_global_guard_is_never_disabled():
    decode_image(_encode(Image.new("RGB", (2, 2)), "PNG"), DEFAULT_LIMITS)
    assert Image.MAX_IMAGE_PIXELS is not None and DEFAULT_LIMITS.max_pixels <= Image.MAX_IMAGE_PIXELS
    with pytest.raises(pydantic.ValidationError):
        DecodeLimits(max_pixels=Image.MAX_IMAGE_PIXELS + 1)


# ---- colour modes and geometry -------------------------------------------------------------------------------


def _tiny(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(sum(size) + len(mode))
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 4, size=size[::-1], dtype=np.uint8)).convert("P")
        image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90])
        return image
    channels = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    assert image.mode == mode
    return image


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA"])
def test_tiny_images_in_every_mode_match_vllm_rgb_conversion(mode, size):
    original = _tiny(mode, size)
    decoded = decode_image(_encode(original, "PNG"), DEFAULT_LIMITS)
    assert decoded.mode == "RGB" and decoded.size == size
    np.testing.assert_array_equal(np.asarray(decoded), _vllm_rgb(Image.open(io.BytesIO(_encode(original, "PNG")))))


def test_alpha_is_flattened_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 255, 128)])
    decoded = decode_image(_encode(rgba, "PNG"), DEFAULT_LIMITS)
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (127, 127, 255)]
    np.testing.assert_array_equal(np.asarray(decoded), _vllm_rgb(rgba))


def test_grey_alpha_is_flattened_onto_white():
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    decoded = decode_image(_encode(la, "PNG"), DEFAULT_LIMITS)
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (40, 40, 40)]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_flattened_onto_white(fmt):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1])
    decoded = decode_image(_encode(palette_image, fmt, transparency=0), DEFAULT_LIMITS)
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (10, 200, 30)]


def test_colour_keys_follow_vllm_grey_flattened_rgb_kept():
    # vLLM returns RGB images untouched, so an RGB colour key keeps its colour; a grey key goes through RGBA.
    keyed = Image.new("RGB", (2, 1))
    keyed.putdata([(1, 2, 3), (4, 5, 6)])
    decoded = decode_image(_encode(keyed, "PNG", transparency=(1, 2, 3)), DEFAULT_LIMITS)
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(1, 2, 3), (4, 5, 6)]
    grey = Image.new("L", (2, 1))
    grey.putdata([7, 9])
    grey_png = _encode(grey, "PNG", transparency=7)
    decoded = decode_image(grey_png, DEFAULT_LIMITS)
    assert [decoded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (9, 9, 9)]
    np.testing.assert_array_equal(np.asarray(decoded), _vllm_rgb(Image.open(io.BytesIO(grey_png))))


def test_cmyk_converts_deterministically():
    cmyk_jpeg = _encode(Image.new("CMYK", (8, 8), (10, 20, 30, 40)), "JPEG", quality=95)
    first = decode_image(cmyk_jpeg, DEFAULT_LIMITS)
    second = decode_image(cmyk_jpeg, DEFAULT_LIMITS)
    assert first.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_array_equal(np.asarray(first), _vllm_rgb(Image.open(io.BytesIO(cmyk_jpeg))))


def test_sixteen_bit_grey_keeps_its_high_byte():
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    decoded = decode_image(_encode(Image.fromarray(values), "PNG"), DEFAULT_LIMITS)
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0))[0] for x in range(5)] == [0, 0, 1, 128, 255]


def test_exif_orientation_six_transposes_the_image():
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    decoded = decode_image(_encode(stored, "JPEG", quality=95, exif=exif.tobytes()), DEFAULT_LIMITS)
    assert decoded.size == (32, 64)
    top, bottom = decoded.getpixel((16, 8)), decoded.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    animated = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    assert Image.open(io.BytesIO(animated)).n_frames == 3
    decoded = decode_image(animated, DEFAULT_LIMITS)
    assert decoded.size == (10, 6)
    assert decoded.getpixel((5, 3)) == (255, 0, 0)


# ---- broken input ----------------------------------------------------------------------------------------------


def _corrupt_payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    photo = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    jpeg = _encode(photo, "JPEG")
    png = _encode(photo, "PNG")
    idat = png.index(b"IDAT")
    return {
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "truncated png": png[: len(png) // 2],
        "png with corrupt data": png[: idat + 20] + bytes(64) + png[idat + 84 :],
        "jpeg magic then noise": b"\xff\xd8\xff\xe0" + rng.bytes(300),
        "gif header only": b"GIF89a\x10\x00\x10\x00",
    }


@pytest.mark.parametrize("name", sorted(_corrupt_payloads()))
def test_corrupt_input_gets_a_fixed_message_without_pillow_text(name):
    payload = _corrupt_payloads()[name]
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(payload, DEFAULT_LIMITS)
    error = raised.value
    assert error.message == UNREADABLE_MESSAGE
    assert str(error) == UNREADABLE_MESSAGE
    assert error.to_body()["error"]["message"] == UNREADABLE_MESSAGE


def test_unknown_bytes_and_empty_input_get_fixed_messages():
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(b"definitely not an image", DEFAULT_LIMITS)
    assert raised.value.message == "The image format is not supported; send one of: JPEG, PNG, WEBP, GIF, BMP, TIFF."
    with pytest.raises(InvalidRequestError):
        decode_image(b"", DEFAULT_LIMITS)


def test_mode_without_rgb_conversion_gets_a_fixed_message():
    with pytest.raises(InvalidRequestError) as raised:
        to_rgb(Image.new("La", (2, 2)))
    assert raised.value.message == UNSUPPORTED_MODE_MESSAGE


def test_pillow_bomb_guard_maps_to_a_fixed_message():
    # Beyond twice MAX_IMAGE_PIXELS Pillow's own guard fires inside Image.open, before our header check.
    with pytest.raises(PayloadTooLargeError) as raised:
        decode_image(_png_declaring(40_000, 40_000), DecodeLimits(max_side=50_000))
    assert raised.value.message == BOMB_MESSAGE
