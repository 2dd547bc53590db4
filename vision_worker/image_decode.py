"""Untrusted image bytes -> RGB PIL image, with the checks a public gateway needs.

Order of work, cheapest check first:
1. byte size against `max_bytes`;
2. `Image.open(..., formats=allowed)`: Pillow sniffs the magic bytes and tries ONLY the allowed plugins, so a
   declared content type never matters and EPS (Ghostscript), PDF, PSD, JPEG2000, FITS and the like are never
   parsed (they cannot even be configured in);
3. width, height and pixel count from the HEADER, before any pixel is decoded (decompression bombs stop here;
   Pillow's own, looser `MAX_IMAGE_PIXELS` guard is kept as a second line and mapped to the same error);
4. decode the first frame only (animated GIF/WEBP/PNG, multi-page TIFF);
5. EXIF orientation applied, then conversion to RGB.

RGB conversion follows vLLM's `convert_image_mode(image, "RGB")` (the path both of its InternVL processors see) so
preprocessing parity holds: anything with transparency (RGBA, LA, PA, or a `transparency` entry such as a PNG
tRNS chunk or a GIF transparent index) goes to RGBA and is pasted with its alpha onto WHITE (255, 255, 255);
everything else uses Pillow's `convert("RGB")` (CMYK, YCbCr, palette, 1-bit, L). As in vLLM, an image that is
already RGB is returned as is, so an RGB colour key (PNG tRNS on an RGB image) keeps its colour.
One deliberate deviation: 16-bit greyscale (`I;16*`) keeps its high byte (v >> 8), the same reduction Pillow
applies to 16-bit colour PNGs, where `convert` would clip every value above 255 to white.

Every client-facing failure is a `dvd_serve.common.errors` value with one of the FIXED messages below: Pillow's
exception text (which can hold file offsets or object addresses) never reaches a client.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field, field_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import InvalidRequestError, PayloadTooLargeError

DEFAULT_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Formats that may shell out (EPS: Ghostscript), are stub/handler drivers, or are large attack surfaces we do not
# need. They are refused even when configured.
NEVER_ALLOWED_FORMATS: frozenset[str] = frozenset(
    {"EPS", "PDF", "PSD", "JPEG2000", "FITS", "WMF", "BUFR", "GRIB", "HDF5", "MPEG"}
)
WHITE = (255, 255, 255)
_MODES_WITH_ALPHA = ("RGBA", "LA", "PA")
_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SNIFF_BYTES = 16  # what Image.open hands each plugin's accept()

INVALID_IMAGE_CODE = "invalid_image"
IMAGE_TOO_LARGE_CODE = "image_too_large"
EMPTY_MESSAGE = "The image is empty."
UNREADABLE_MESSAGE = "The image could not be decoded: the data is corrupt, truncated or not an image."
UNSUPPORTED_MODE_MESSAGE = "The image uses a colour mode that cannot be converted to RGB."
BOMB_MESSAGE = "The image declares more pixels than this server accepts."


class DecodeLimits(FrozenConfig):
    """What `decode_image` accepts. Defaults suit a public gateway (OpenAI-like 20 MiB, up to ~50 megapixels)."""

    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded image accepted, in bytes.")
    max_pixels: int = Field(
        50_000_000,
        gt=0,
        le=Image.MAX_IMAGE_PIXELS,
        description="Largest width*height accepted, checked from the header before decoding. At most Pillow's "
        "MAX_IMAGE_PIXELS so Pillow's own guard never decides first with another message.",
    )
    max_side: int = Field(16_384, gt=0, description="Largest width or height accepted, in pixels.")
    allowed_formats: tuple[str, ...] = Field(
        DEFAULT_ALLOWED_FORMATS,
        min_length=1,
        description="Pillow format names tried when sniffing the bytes (upper case, e.g. 'JPEG', 'PNG').",
    )

    @field_validator("allowed_formats")
    @classmethod
    def _known_and_safe(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        names = tuple(name.upper() for name in formats)
        forbidden = sorted(set(names) & NEVER_ALLOWED_FORMATS)
        if forbidden:
            raise ValueError(f"formats {forbidden} are never allowed for untrusted input")
        unknown = sorted(name for name in names if name not in Image.OPEN)
        if unknown:
            raise ValueError(f"formats {unknown} are not readable by this Pillow build")
        return names


def decode_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """Decode untrusted bytes into a loaded RGB image (first frame, EXIF orientation applied)."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"The image is larger than {limits.max_bytes} bytes.", code=IMAGE_TOO_LARGE_CODE
        )
    if not data:
        raise InvalidRequestError(EMPTY_MESSAGE, code=INVALID_IMAGE_CODE)
    image = _open_sniffed(data, limits.allowed_formats)
    _check_header_size(image.size, limits)
    try:
        image.load()
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(BOMB_MESSAGE, code=IMAGE_TOO_LARGE_CODE) from None
    except Exception as error:  # plugins raise OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise InvalidRequestError(UNREADABLE_MESSAGE, code=INVALID_IMAGE_CODE) from error
    _apply_exif_orientation(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a loaded image: alpha flattened onto white, 16-bit grey reduced to its high byte."""
    if image.mode == "RGB":
        return image
    try:
        if image.mode in _SIXTEEN_BIT_GREY_MODES:
            return _sixteen_bit_grey_to_rgb(image)
        if _has_transparency(image):
            return _flatten_onto_white(image if image.mode == "RGBA" else image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as error:  # Pillow has no path from this mode to RGB (e.g. LAB, HSV)
        raise InvalidRequestError(UNSUPPORTED_MODE_MESSAGE, code=INVALID_IMAGE_CODE) from error


def _open_sniffed(data: bytes, allowed_formats: tuple[str, ...]) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=list(allowed_formats))
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(BOMB_MESSAGE, code=IMAGE_TOO_LARGE_CODE) from None
    except Image.UnidentifiedImageError:
        if _allowed_plugin_recognises(data, allowed_formats):  # right magic bytes, broken header
            raise InvalidRequestError(UNREADABLE_MESSAGE, code=INVALID_IMAGE_CODE) from None
        raise InvalidRequestError(
            f"The image format is not supported; send one of: {', '.join(allowed_formats)}.",
            code=INVALID_IMAGE_CODE,
        ) from None
    except Exception as error:  # a recognised header that its plugin then fails to parse
        raise InvalidRequestError(UNREADABLE_MESSAGE, code=INVALID_IMAGE_CODE) from error


def _allowed_plugin_recognises(data: bytes, allowed_formats: tuple[str, ...]) -> bool:
    prefix = data[:_SNIFF_BYTES]
    for name in allowed_formats:
        accept = Image.OPEN[name][1]
        if accept is not None and accept(prefix):
            return True
    return False


def _check_header_size(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidRequestError(UNREADABLE_MESSAGE, code=INVALID_IMAGE_CODE)
    if width > limits.max_side or height > limits.max_side:
        raise PayloadTooLargeError(
            f"The image is larger than {limits.max_side} pixels on a side.", code=IMAGE_TOO_LARGE_CODE
        )
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"The image has more than {limits.max_pixels} pixels.", code=IMAGE_TOO_LARGE_CODE
        )


def _apply_exif_orientation(image: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is metadata, not a reason to fail (as in vLLM)
        pass


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _MODES_WITH_ALPHA or "transparency" in image.info


def _flatten_onto_white(rgba: Image.Image) -> Image.Image:
    flattened = Image.new("RGB", rgba.size, WHITE)
    flattened.paste(rgba, mask=rgba.getchannel("A"))
    return flattened


def _sixteen_bit_grey_to_rgb(image: Image.Image) -> Image.Image:
    high_bytes = (np.asarray(image) >> 8).astype(np.uint8)  # [h, w] in either byte order
    return Image.fromarray(high_bytes).convert("RGB")
