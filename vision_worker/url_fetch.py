"""SSRF-safe download of one image URL (http/https), for the vision workers.

The rules, in order, each checked again at every redirect hop:
1. One parser (`parse_image_url`) reads the URL and refuses anything two URL parsers could read differently:
   userinfo (`@`), backslashes, fragments (`#`), whitespace, control characters or lone surrogates, `%` in the host,
   empty or trailing-dot labels, host names that are not valid IDNA 2008 without mapping, and IPv4 written any way
   but four plain decimal numbers (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1` are refused, not reinterpreted).
2. Scheme, port and the optional domain allowlist are checked on the parsed host.
3. We resolve the name ourselves and refuse the URL if ANY address is not public (loopback, RFC 1918, link-local,
   CGNAT, ULA, multicast, unspecified, reserved, documentation ranges, and every IPv6 form that embeds an IPv4
   address: mapped, compatible, 6to4, Teredo, NAT64).
4. We connect to the checked address itself (the URL's host replaced by the IP, `Host` header and TLS SNI set to the
   name, certificates verified against the name), so a second DNS answer cannot move the connection (rebinding).
5. Redirects are followed by hand, at most `max_redirects`; bodies are read with a byte cap and the whole fetch,
   DNS included, runs under one deadline. Markup (HTML, XML, SVG) and non-image content types are refused.

Failure mapping (messages are fixed; no address, host or library text reaches the client):
- `InvalidRequestError` (400; `PayloadTooLargeError` 413 for size): the client's URL is at fault - malformed,
  blocked address, not on the allowlist, name does not exist (NXDOMAIN), origin answered 4xx, too many redirects,
  not an image, too large.
- `UpstreamError` (502): the origin failed - 5xx, refused or reset connection, TLS failure, protocol violations
  (including a Content-Length the body does not match), temporary DNS failure.
- `DeadlineExceededError` (504): the total or connect/read deadline passed.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, urljoin

import certifi
import httpx
import idna
from pydantic import Field, field_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PayloadTooLargeError,
    UpstreamError,
)

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
IMAGE_CONTENT_TYPES_OUTSIDE_IMAGE = frozenset({"application/octet-stream", "binary/octet-stream"})
_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HOST_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0[xX][0-9a-fA-F]*)$")
_DECIMAL_OCTET = re.compile(r"^(?:0|[1-9][0-9]{0,2})$")
_UNICODE_DOTS = ("\u3002", "\uff0e", "\uff61")  # IDNA treats these as "." too
# Printable ASCII other than space; non-ASCII in path and query is percent-encoded as UTF-8.
_TARGET_SAFE = "".join(chr(code) for code in range(0x21, 0x7F))

# Checked in addition to `ipaddress`' own flags, whose coverage differs between Python versions.
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
        "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)


class UrlFetchConfig(FrozenConfig):
    """How the vision workers fetch image URLs. The defaults are the safe public-internet setting."""

    allow_private_networks: bool = Field(
        default=False,
        description="Also allow loopback, private, link-local, CGNAT and ULA addresses (tests, trusted "
        "intranets). Multicast and unspecified addresses stay refused.",
    )
    allowed_domains: tuple[str, ...] | None = Field(
        default=None,
        description="If set, only these host names and their subdomains (lower-case ASCII/punycode) are fetched.",
    )
    allowed_schemes: tuple[Literal["http", "https"], ...] = Field(
        default=("http", "https"), description="URL schemes that may be fetched (also after a redirect)."
    )
    allowed_ports: tuple[int, ...] | None = Field(
        default=None, description="If set, the only TCP ports that may be contacted."
    )
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Largest image body accepted, in bytes.")
    connect_timeout_s: float = Field(default=5.0, gt=0.0, description="Seconds to open one TCP/TLS connection.")
    read_timeout_s: float = Field(default=10.0, gt=0.0, description="Seconds to wait for any single read.")
    total_timeout_s: float = Field(
        default=20.0, gt=0.0, description="Seconds for the whole fetch: DNS, every redirect hop and the body."
    )
    max_redirects: int = Field(default=5, ge=0, le=20, description="Redirects followed before giving up.")
    user_agent: str = Field(default="dvd-serve-image-fetch/1", description="User-Agent header sent to origins.")

    @field_validator("allowed_domains")
    @classmethod
    def _domains_are_ascii_names(cls, domains: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for domain in domains or ():
            if domain != domain.lower() or not all(_HOST_LABEL.match(label) for label in domain.split(".")):
                raise ValueError(f"allowed domain {domain!r} is not a lower-case ASCII host name")
        return domains


@dataclass(frozen=True, slots=True)
class ImageUrl:
    """An http(s) URL that passed the parser: canonical parts only."""

    scheme: str  # "http" | "https"
    host: str  # lower-case ASCII name (IDNA applied) or the IP literal's canonical text
    port: int
    target: str  # path and query as sent in the request line, starting with "/"
    ip_literal: IPAddress | None

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip_literal, ipaddress.IPv6Address) else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def text(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"

    def url_to_address(self, address: IPAddress) -> str:
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def _bad_url(reason: str) -> InvalidRequestError:
    logger.info("image URL refused by the parser: %s", reason)
    return InvalidRequestError("The image URL is malformed or not allowed.", code="invalid_image_url")


def parse_image_url(url: str, allowed_schemes: tuple[str, ...] = ("http", "https")) -> ImageUrl:
    """Parses and canonicalises `url`, refusing every ambiguous form (see the module docstring)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise _bad_url("empty or too long")
    if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF for char in url):
        raise _bad_url("whitespace, control character or lone surrogate")
    if "\\" in url or "#" in url:
        raise _bad_url("backslash or fragment")
    scheme_match = _SCHEME_PREFIX.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme not in allowed_schemes or scheme not in DEFAULT_PORTS:
        raise _unsupported_scheme()
    rest = url[scheme_match.end():]
    if not rest.startswith("//"):
        raise _bad_url("no authority")
    rest = rest[2:]
    authority_end = min((index for index in (rest.find("/"), rest.find("?")) if index >= 0), default=len(rest))
    authority, target = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        raise _bad_url("userinfo")
    host_text, port = _split_port(authority, DEFAULT_PORTS[scheme])
    host, ip_literal = _canonical_host(host_text)
    if not target.startswith("/"):
        target = "/" + target
    return ImageUrl(scheme, host, port, quote(target, safe=_TARGET_SAFE), ip_literal)


def _split_port(authority: str, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        close = authority.find("]")
        host_text, after = authority[: close + 1], authority[close + 1:]
        if close < 0 or (after and not after.startswith(":")):
            raise _bad_url("bracketed host")
        port_text = after[1:] if after else None
    else:
        host_text, colon, port_text = authority.partition(":")
        port_text = port_text if colon else None
    if port_text is None:
        return host_text, default_port
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad_url("port")
    return host_text, int(port_text)


def _canonical_host(host_text: str) -> tuple[str, IPAddress | None]:
    if "%" in host_text or not host_text:
        raise _bad_url("empty host or percent in host")
    if host_text.startswith("["):
        try:
            address = ipaddress.IPv6Address(host_text[1:-1])
        except ValueError:
            raise _bad_url("IPv6 literal") from None
        return str(address), address
    if not host_text.isascii():
        if any(dot in host_text for dot in _UNICODE_DOTS):
            raise _bad_url("non-ASCII label separator")
        # Strict IDNA 2008, no UTS 46 mapping: names that only become valid after mapping (full-width dots,
        # zero-width characters, compatibility forms) are look-alike material and refused.
        try:
            host_text = idna.encode(host_text.lower()).decode("ascii")
        except idna.IDNAError:
            raise _bad_url("not IDNA-encodable") from None
    host = host_text.lower()
    labels = host.split(".")
    if len(host) > 253 or any(not label for label in labels):
        raise _bad_url("empty label or trailing dot")
    if _NUMERIC_LABEL.match(labels[-1]):
        # A host ending in a number is an IPv4 address to URL parsers; only the plain dotted-decimal form is kept.
        if len(labels) != 4 or not all(_DECIMAL_OCTET.match(label) and int(label) < 256 for label in labels):
            raise _bad_url("non-canonical IPv4 form")
        address = ipaddress.IPv4Address(host)
        return str(address), address
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise _bad_url("host label characters")
    return host, None


def is_public_address(address: IPAddress) -> bool:
    """True only for globally routable unicast addresses that embed no IPv4 address."""
    if address.is_multicast or address.is_unspecified or address.is_reserved or not address.is_global:
        return False
    return not any(address in network for network in BLOCKED_NETWORKS if network.version == address.version)


def _address_allowed(address: IPAddress, config: UrlFetchConfig) -> bool:
    if config.allow_private_networks:
        return not (address.is_multicast or address.is_unspecified)
    return is_public_address(address)


def _check_url_policy(url: ImageUrl, config: UrlFetchConfig) -> None:
    if url.scheme not in config.allowed_schemes:
        raise _unsupported_scheme()
    if config.allowed_ports is not None and url.port not in config.allowed_ports:
        raise InvalidRequestError("The image URL port is not allowed.", code="image_url_not_allowed")
    if config.allowed_domains is not None and not any(
        url.host == domain or url.host.endswith("." + domain) for domain in config.allowed_domains
    ):
        raise InvalidRequestError("The image URL host is not on the allowlist.", code="image_url_not_allowed")


async def resolve_checked_addresses(url: ImageUrl, config: UrlFetchConfig) -> list[IPAddress]:
    """The addresses to connect to; refuses the URL if any address the name resolves to is not allowed."""
    if url.ip_literal is not None:
        addresses = [url.ip_literal]
    else:
        addresses = await _resolve(url.host, url.port)
    if not addresses or not all(_address_allowed(address, config) for address in addresses):
        logger.info("image URL host %s refused: resolves to a blocked address %s", url.host, addresses)
        raise InvalidRequestError("The image URL points to a blocked address.", code="image_url_blocked")
    return addresses


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as error:
        missing_codes = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
        if error.errno in missing_codes:
            raise InvalidRequestError(
                "The image URL host name does not exist.", code="image_url_unresolvable"
            ) from None
        raise UpstreamError("The image URL host name could not be resolved.", code="image_url_dns_failure") from None
    unique: dict[IPAddress, None] = {}
    for _family, _type, _proto, _canonname, sockaddr in infos:
        # Scope ids ("fe80::1%eth0") are dropped: the bare address is what gets checked and connected to.
        unique[ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])] = None
    return list(unique)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


async def fetch_image_bytes(url: str, config: UrlFetchConfig) -> bytes:
    """Downloads the image at `url` under every rule of the module docstring; raises `ServingError`s only."""
    context = await asyncio.to_thread(_tls_context)
    try:
        async with asyncio.timeout(config.total_timeout_s):
            current = parse_image_url(url, config.allowed_schemes)
            for _hop in range(config.max_redirects + 1):
                _check_url_policy(current, config)
                addresses = await resolve_checked_addresses(current, config)
                outcome = await _fetch_one_hop(current, addresses, config, context)
                if isinstance(outcome, bytes):
                    return outcome
                current = parse_image_url(urljoin(current.text, outcome), config.allowed_schemes)
    except TimeoutError:
        raise _timed_out() from None
    raise InvalidRequestError("The image URL redirects too many times.", code="image_url_too_many_redirects")


def _unsupported_scheme() -> InvalidRequestError:
    return InvalidRequestError("The image URL scheme is not supported.", code="unsupported_image_url_scheme")


def _bad_response() -> UpstreamError:
    return UpstreamError("The image URL's server sent an invalid response.", code="image_url_bad_response")


def _not_an_image() -> InvalidRequestError:
    return InvalidRequestError("The image URL did not return an image.", code="image_url_not_an_image")


def _too_large() -> PayloadTooLargeError:
    return PayloadTooLargeError("The image at the URL is too large.", code="image_too_large")


def _timed_out() -> DeadlineExceededError:
    return DeadlineExceededError("Fetching the image URL timed out.", code="image_url_timeout")


def _unreachable() -> UpstreamError:
    return UpstreamError("The image URL's server could not be reached.", code="image_url_unreachable")


async def _fetch_one_hop(
    url: ImageUrl, addresses: list[IPAddress], config: UrlFetchConfig, context: ssl.SSLContext
) -> bytes | str:
    """The body (bytes) or the redirect's Location (str). Tries the checked addresses in order until one connects."""
    timeout = httpx.Timeout(
        connect=config.connect_timeout_s, read=config.read_timeout_s, write=config.read_timeout_s, pool=None
    )
    transport = httpx.AsyncHTTPTransport(verify=context, retries=0, limits=httpx.Limits(max_keepalive_connections=0))
    async with httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False) as client:
        for address in addresses:
            request = client.build_request(
                "GET",
                url.url_to_address(address),
                headers={
                    "Host": url.authority,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                    "User-Agent": config.user_agent,
                },
                extensions={"sni_hostname": url.host} if url.ip_literal is None else {},
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as error:
                if _caused_by_tls(error):
                    logger.info("TLS failure fetching from %s (%s)", url.host, address)
                    raise UpstreamError("TLS with the image URL's server failed.", code="image_url_tls_error") from None
                logger.info("connection to %s (%s) failed", url.host, address)
                continue
            except httpx.TimeoutException:
                raise _timed_out() from None
            except httpx.HTTPError:
                raise _unreachable() from None
            try:
                return await _read_response(response, config)
            except httpx.TimeoutException:
                raise _timed_out() from None
            except httpx.HTTPError:
                logger.info("bad HTTP response from %s (%s)", url.host, address)
                raise _bad_response() from None
            finally:
                await response.aclose()
    raise _unreachable()


def _caused_by_tls(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _read_response(response: httpx.Response, config: UrlFetchConfig) -> bytes | str:
    status = response.status_code
    if status in REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise _bad_response()
        return location
    _check_status(status)
    _check_headers(response.headers, config)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > config.max_bytes:
            raise _too_large()
    if not body:
        raise InvalidRequestError("The image URL returned no data.", code="image_url_empty")
    if body.lstrip()[:1] == b"<":
        raise _not_an_image()
    return bytes(body)


def _check_status(status: int) -> None:
    if status == 200:
        return
    if status in (404, 410):
        raise InvalidRequestError("The image URL was not found at its server.", code="image_url_not_found")
    if status in (401, 403):
        raise InvalidRequestError("The image URL's server refused access.", code="image_url_forbidden")
    if 400 <= status < 500:
        raise InvalidRequestError("The image URL's server rejected the request.", code="image_url_client_error")
    if status >= 500:
        raise UpstreamError("The image URL's server failed.", code="image_url_server_error")
    raise _bad_response()


def _check_headers(headers: httpx.Headers, config: UrlFetchConfig) -> None:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _bad_response()
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    is_raster_image = content_type.startswith("image/") and "svg" not in content_type
    if content_type and not (is_raster_image or content_type in IMAGE_CONTENT_TYPES_OUTSIDE_IMAGE):
        raise _not_an_image()
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad_response()
        if int(declared) > config.max_bytes:
            raise _too_large()
