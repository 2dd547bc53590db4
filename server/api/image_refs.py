"""Early checks of `image_url.url` values, done by the gateway before any image work is scheduled.

Accepted: `data:image/<subtype>[;param=value...];base64,<strict base64>` (`data:` and `;base64` in lower case,
as the vision side's `image_source` reads them) and http(s) URLs that pass the vision service's own URL parser
(`vision_worker.url_fetch.parse_image_url`), so both sides read every URL the same way.
Everything else (file://, ftp:, bare paths, percent-encoded data URLs, bad base64, empty data) is a 400 whose
`param` names the content part. Address checks (private networks, DNS) happen where the fetch happens.
"""

from __future__ import annotations

import binascii
import re

from dvd_serve.common.errors import InvalidRequestError, ServingError
from dvd_serve.vision_worker.url_fetch import parse_image_url

_DATA_URL_HEADER = re.compile(r"^data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9._+-]+=[A-Za-z0-9._+-]+)*;base64,")


def check_image_reference(url: str, param: str) -> None:
    """Raises `InvalidRequestError` (param = `param`) unless `url` is a usable data URL or http(s) URL."""
    if url.startswith("data:"):
        _check_data_url(url, param)
        return
    try:
        parse_image_url(url)
    except ServingError as error:
        raise error.with_param(param) from None


def _check_data_url(url: str, param: str) -> None:
    header = _DATA_URL_HEADER.match(url)
    if header is None:
        raise InvalidRequestError(
            "Image data URLs must look like data:image/<format>;base64,<data>.", code="invalid_data_url", param=param
        )
    payload = url[header.end():]
    if not payload:
        raise InvalidRequestError("The image data URL is empty.", code="invalid_data_url", param=param)
    try:
        binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            "The image data URL is not valid base64.", code="invalid_base64", param=param
        ) from None
