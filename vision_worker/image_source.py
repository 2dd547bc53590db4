"""Turns an `image_url` reference into image bytes: `data:` URLs decoded here, http(s) via the SSRF guard."""

from __future__ import annotations

import base64
import binascii

from dvd_serve.common.errors import InvalidRequestError, PayloadTooLargeError
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig, fetch_image_bytes


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes. Only base64 payloads are accepted."""
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidRequestError("Image data URLs must be base64 encoded.", code="invalid_data_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise PayloadTooLargeError("The image is larger than allowed.", code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("The image data URL is not valid base64.", code="invalid_base64") from None
    if not data:
        raise InvalidRequestError("The image data URL is empty.", code="empty_image")
    return data


async def load_image_bytes(url: str, fetch: UrlFetchConfig) -> bytes:
    if url.startswith("data:"):
        return decode_data_url(url, fetch.max_bytes)
    return await fetch_image_bytes(url, fetch)
