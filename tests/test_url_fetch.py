"""The SSRF-safe image fetcher against a canary HTTP server on 127.0.0.1 that counts every connection."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from dvd_serve.common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServingError,
    UpstreamError,
)
from dvd_serve.vision_worker import url_fetch
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig, fetch_image_bytes, is_public_address, parse_image_url

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
LOOPBACK_OK = UrlFetchConfig(allow_private_networks=True, total_timeout_s=5.0)

Handler = Callable[[asyncio.StreamWriter, "CanaryServer"], Awaitable[None]]


def http_response(status: int, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def fixed(status: int, body: bytes = b"", content_type: str = "image/png", **extra: str) -> Handler:
    async def handle(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **extra}
        writer.write(http_response(status, headers, body))
        await writer.drain()

    return handle


def redirect(location: str, status: int = 302) -> Handler:
    async def handle(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
        writer.write(http_response(status, {"Location": location.format(port=server.port), "Content-Length": "0"}))
        await writer.drain()

    return handle


async def slow_drip(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
    writer.write(http_response(200, {"Content-Type": "image/png", "Content-Length": "100000"}))
    for _ in range(200):
        writer.write(b"\x00")
        await writer.drain()
        await asyncio.sleep(0.05)


async def endless(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
    writer.write(http_response(200, {"Content-Type": "image/png", "Transfer-Encoding": "chunked"}))
    chunk = b"%x\r\n" % 65536 + b"\x00" * 65536 + b"\r\n"
    while True:
        writer.write(chunk)
        server.bytes_sent += 65536
        await writer.drain()


async def short_body(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
    writer.write(http_response(200, {"Content-Type": "image/png", "Content-Length": "5000"}, PNG_BYTES[:100]))
    await writer.drain()


async def longer_than_declared(writer: asyncio.StreamWriter, server: CanaryServer) -> None:
    writer.write(http_response(200, {"Content-Type": "image/png", "Content-Length": "20"}, PNG_BYTES * 64))
    await writer.drain()


class CanaryServer:
    """Minimal HTTP/1.1 server: routes by path, records every connection and request."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bytes_sent = 0
        self.routes: dict[str, Handler] = {"/image.png": fixed(200, PNG_BYTES)}
        self._handlers: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 5)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._handlers.add(asyncio.current_task())
        self._writers.add(writer)
        try:
            first_byte = await reader.readexactly(1)
            if first_byte == b"\x16":  # a TLS ClientHello: answer in plain HTTP, like a misconfigured origin
                writer.write(http_response(400, {"Content-Length": "0"}))
                return
            head = (first_byte + await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            path = request_line.split(" ")[1]
            headers = dict(line.lower().split(": ", 1) for line in header_lines if line)
            self.requests.append((path, headers))
            await self.routes.get(path, fixed(404, b"not here", "text/plain"))(writer, self)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError, ValueError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def canary():
    server = CanaryServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_dns(monkeypatch):
    """Replaces the running loop's resolver: name -> list of answers, one list per successive lookup."""
    answers: dict[str, list[list[str]]] = {}
    lookups: list[str] = []
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        queue = answers[host]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(addresses, BaseException):
            raise addresses
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in addresses
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return answers, lookups


@pytest.fixture
def canary_is_public(monkeypatch):
    """Treat 127.0.0.1 (and only it) as a public origin, to test what happens after a first allowed hop."""
    real = url_fetch.is_public_address
    monkeypatch.setattr(
        url_fetch, "is_public_address", lambda address: address == ipaddress.ip_address("127.0.0.1") or real(address)
    )


async def expect_refusal(url: str, config: UrlFetchConfig, error_type: type[ServingError], code: str) -> ServingError:
    with pytest.raises(error_type) as caught:
        await fetch_image_bytes(url, config)
    assert caught.value.code == code
    for internal in ("127.0.0.", "10.0.0.", "169.254", "::1", "fc00", "localhost"):
        assert internal not in caught.value.message
    return caught.value


# ---------- the parser ----------

REFUSED_URLS = [
    "file:///etc/passwd", "ftp://example.com/a.png", "/etc/passwd", "etc/passwd", "gopher://example.com/",
    "http://user@example.com/a.png", "http://user:pw@example.com/", "http://example.com\\@evil.com/",
    "http://a.com#@evil.com/", "http://example.com/a.png#frag", "http://exa mple.com/", "http://example.com/a b",
    "http://example.com/\t", " http://example.com/", "http://example.com./", "http://.example.com/",
    "http://ex%61mple.com/", "http://ex_ample.com/", "http://2130706433/", "http://0177.0.0.1/",
    "http://0x7f.0.0.1/", "http://0x7f000001/", "http://127.1/", "http://127.0.0.01/", "http://1.2.3.4.5/",
    "http://[fe80::1%25eth0]/", "http://[::1/", "http://example.com:0/", "http://example.com:99999/",
    "http://example.com:/", "http://example.com:+80/", "http:/example.com/", "http:example.com",
    "http://a\u200bb.com/", "http://ex\uff0eample.com/", "http://" + "a" * 8200 + ".com/", "",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_parser_refuses_ambiguous_or_unsupported_urls(url):
    with pytest.raises(InvalidRequestError) as caught:
        parse_image_url(url)
    assert caught.value.code in ("invalid_image_url", "unsupported_image_url_scheme")


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "target"),
    [
        ("HTTPS://Images.Example.COM/a.png?x=1", "https", "images.example.com", 443, "/a.png?x=1"),
        ("http://example.com", "http", "example.com", 80, "/"),
        ("http://example.com:8080?q", "http", "example.com", 8080, "/?q"),
        ("http://bücher.example/b.jpg", "http", "xn--bcher-kva.example", 80, "/b.jpg"),
        ("http://example.com/\u56fe.png", "http", "example.com", 80, "/%E5%9B%BE.png"),
        ("http://93.184.216.34/i.png", "http", "93.184.216.34", 80, "/i.png"),
        ("https://[2606:4700::1111]:8443/i", "https", "2606:4700::1111", 8443, "/i"),
    ],
)
def test_parser_canonicalises(url, scheme, host, port, target):
    parsed = parse_image_url(url)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.target) == (scheme, host, port, target)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
        ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
        ("0.0.0.0", False), ("0.1.2.3", False), ("224.0.0.1", False), ("255.255.255.255", False),
        ("240.0.0.1", False), ("198.18.0.1", False), ("::1", False), ("::", False), ("fe80::1", False),
        ("fc00::1", False), ("fd12:3456::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
        ("::ffff:93.184.216.34", False), ("::7f00:1", False), ("64:ff9b::a00:1", False), ("2002:7f00:1::", False),
        ("2001::1", False), ("2001:db8::1", False), ("fec0::1", False),
    ],
)
def test_address_classification(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


# ---------- blocked targets: zero connections ----------

BLOCKED_TARGETS = [
    "127.0.0.1", "localhost", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "10.0.0.1",
    "172.16.5.4", "192.168.0.1", "169.254.169.254", "100.64.0.1", "[fc00::1]", "[fe80::1]", "0.0.0.0",
]


@pytest.mark.parametrize("host", BLOCKED_TARGETS)
async def test_blocked_addresses_are_refused_without_connecting(canary, host):
    await expect_refusal(canary.url("/image.png", host), UrlFetchConfig(), InvalidRequestError, "image_url_blocked")
    assert canary.connections == 0


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1", "0x7f000001", "017700000001"])
async def test_numeric_ipv4_forms_are_refused_without_connecting(canary, host):
    await expect_refusal(canary.url("/image.png", host), LOOPBACK_OK, InvalidRequestError, "invalid_image_url")
    assert canary.connections == 0


async def test_name_with_any_private_answer_is_refused(canary, fake_dns):
    answers, _lookups = fake_dns
    answers["mixed.test"] = [["93.184.216.34", "10.0.0.7"]]
    answers["internal.test"] = [["127.0.0.1"]]
    await expect_refusal(f"http://mixed.test:{canary.port}/image.png", UrlFetchConfig(), InvalidRequestError,
                         "image_url_blocked")
    await expect_refusal(f"http://internal.test:{canary.port}/image.png", UrlFetchConfig(), InvalidRequestError,
                         "image_url_blocked")
    assert canary.connections == 0


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "http://u@127.0.0.1/a.png",
                                 "http://127.0.0.1\\@example.com/"])
async def test_unsupported_or_ambiguous_urls_refused_by_fetch(canary, url):
    with pytest.raises(InvalidRequestError):
        await fetch_image_bytes(url, LOOPBACK_OK)
    assert canary.connections == 0


# ---------- redirects ----------


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.2:{port}/image.png", "http://[::1]:{port}/image.png",
        "http://[::ffff:127.0.0.1]:{port}/image.png", "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/", "http://2130706433:{port}/image.png",
    ],
)
async def test_redirect_to_internal_host_is_refused_at_the_hop(canary, canary_is_public, location):
    canary.routes["/start"] = redirect(location)
    with pytest.raises(InvalidRequestError) as caught:
        await fetch_image_bytes(canary.url("/start"), UrlFetchConfig())
    assert caught.value.code in ("image_url_blocked", "invalid_image_url")
    assert [path for path, _headers in canary.requests] == ["/start"]


async def test_redirect_to_other_scheme_is_refused(canary, canary_is_public):
    canary.routes["/start"] = redirect("file:///etc/passwd")
    await expect_refusal(canary.url("/start"), UrlFetchConfig(), InvalidRequestError, "unsupported_image_url_scheme")


async def test_redirect_chain_within_limit_is_followed(canary):
    canary.routes.update({"/r0": redirect("/r1", 301), "/r1": redirect("http://127.0.0.1:{port}/r2", 307),
                          "/r2": redirect("r3", 308), "/r3": redirect("/image.png", 303)})
    body = await fetch_image_bytes(canary.url("/r0"), LOOPBACK_OK.model_copy(update={"max_redirects": 4}))
    assert body == PNG_BYTES
    assert [path for path, _headers in canary.requests] == ["/r0", "/r1", "/r2", "/r3", "/image.png"]


async def test_redirect_chain_over_the_limit_is_refused(canary):
    for hop in range(12):
        canary.routes[f"/loop{hop}"] = redirect(f"/loop{hop + 1}")
    await expect_refusal(canary.url("/loop0"), LOOPBACK_OK.model_copy(update={"max_redirects": 5}),
                         InvalidRequestError, "image_url_too_many_redirects")
    assert canary.connections == 6  # the first request and five followed redirects


# ---------- bodies: time and byte caps ----------


async def test_slow_drip_body_hits_the_total_deadline(canary):
    canary.routes["/slow"] = slow_drip
    started = time.perf_counter()
    await expect_refusal(canary.url("/slow"), LOOPBACK_OK.model_copy(update={"total_timeout_s": 0.4}),
                         DeadlineExceededError, "image_url_timeout")
    assert time.perf_counter() - started < 2.0


async def test_endless_body_is_cut_at_the_byte_cap(canary):
    canary.routes["/endless"] = endless
    await expect_refusal(canary.url("/endless"), LOOPBACK_OK.model_copy(update={"max_bytes": 256 * 1024}),
                         PayloadTooLargeError, "image_too_large")
    assert canary.bytes_sent < 64 * 1024 * 1024  # the fetcher stopped reading long before the origin gave up


async def test_declared_length_over_the_cap_is_refused_before_reading(canary):
    canary.routes["/huge"] = fixed(200, b"", **{"Content-Length": str(10 * 1024**3)})
    await expect_refusal(canary.url("/huge"), LOOPBACK_OK, PayloadTooLargeError, "image_too_large")


async def test_body_shorter_than_declared_is_an_upstream_error(canary):
    canary.routes["/short"] = short_body
    await expect_refusal(canary.url("/short"), LOOPBACK_OK, UpstreamError, "image_url_bad_response")


async def test_body_longer_than_declared_is_never_read_past_the_declared_length(canary):
    canary.routes["/long"] = longer_than_declared
    assert await fetch_image_bytes(canary.url("/long"), LOOPBACK_OK) == PNG_BYTES[:20]


# ---------- content and status mapping ----------


@pytest.mark.parametrize(
    ("handler", "error_type", "code"),
    [
        (fixed(200, b"<!doctype html><html></html>", "text/html"), InvalidRequestError, "image_url_not_an_image"),
        (fixed(200, b"  <html>pretending</html>", "image/png"), InvalidRequestError, "image_url_not_an_image"),
        (fixed(200, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), InvalidRequestError,
         "image_url_not_an_image"),
        (fixed(200, b"{}", "application/json"), InvalidRequestError, "image_url_not_an_image"),
        (fixed(200, b""), InvalidRequestError, "image_url_empty"),
        (fixed(404, b"no"), InvalidRequestError, "image_url_not_found"),
        (fixed(403, b"no"), InvalidRequestError, "image_url_forbidden"),
        (fixed(429, b"no"), InvalidRequestError, "image_url_client_error"),
        (fixed(500, b"oops"), UpstreamError, "image_url_server_error"),
        (fixed(503, b"oops"), UpstreamError, "image_url_server_error"),
        (fixed(204), UpstreamError, "image_url_bad_response"),
        (fixed(200, PNG_BYTES, **{"Content-Encoding": "gzip"}), UpstreamError, "image_url_bad_response"),
        (redirect(""), UpstreamError, "image_url_bad_response"),
    ],
)
async def test_content_and_status_mapping(canary, handler, error_type, code):
    canary.routes["/target"] = handler
    await expect_refusal(canary.url("/target"), LOOPBACK_OK, error_type, code)


async def test_tls_failure_is_an_upstream_error(canary):
    url = canary.url("/image.png").replace("http://", "https://")  # the canary speaks plain HTTP
    await expect_refusal(url, LOOPBACK_OK, UpstreamError, "image_url_tls_error")


async def test_refused_connection_is_an_upstream_error():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    await expect_refusal(f"http://127.0.0.1:{port}/a.png", LOOPBACK_OK, UpstreamError, "image_url_unreachable")


async def test_dns_failures_map_to_400_and_502(fake_dns):
    answers, _lookups = fake_dns
    answers["flaky.test"] = [socket.gaierror(socket.EAI_AGAIN, "try again")]
    await expect_refusal("http://missing.test/a.png", UrlFetchConfig(), InvalidRequestError, "image_url_unresolvable")
    await expect_refusal("http://flaky.test/a.png", UrlFetchConfig(), UpstreamError, "image_url_dns_failure")


# ---------- what is allowed ----------


async def test_happy_path_with_private_networks_allowed(canary):
    assert await fetch_image_bytes(canary.url("/image.png"), LOOPBACK_OK) == PNG_BYTES
    path, headers = canary.requests[0]
    assert (path, headers["host"], headers["accept-encoding"]) == ("/image.png", f"127.0.0.1:{canary.port}", "identity")


async def test_connection_is_pinned_to_the_checked_address(canary, fake_dns):
    answers, lookups = fake_dns
    # A rebinding resolver: the first answer passes the check, a second lookup would point elsewhere.
    answers["images.test"] = [["127.0.0.1"], ["10.9.9.9"]]
    body = await fetch_image_bytes(f"http://images.test:{canary.port}/image.png", LOOPBACK_OK)
    assert body == PNG_BYTES
    assert lookups == ["images.test"]
    assert canary.requests[0][1]["host"] == f"images.test:{canary.port}"


async def test_domain_allowlist(canary, fake_dns):
    answers, _lookups = fake_dns
    for name in ("images.test", "cdn.images.test", "other.test", "notimages.test"):
        answers[name] = [["127.0.0.1"]]
    config = LOOPBACK_OK.model_copy(update={"allowed_domains": ("images.test",)})
    assert await fetch_image_bytes(f"http://images.test:{canary.port}/image.png", config) == PNG_BYTES
    assert await fetch_image_bytes(f"http://cdn.images.test:{canary.port}/image.png", config) == PNG_BYTES
    for refused in ("other.test", "notimages.test", "127.0.0.1"):
        await expect_refusal(f"http://{refused}:{canary.port}/image.png", config, InvalidRequestError,
                             "image_url_not_allowed")
    assert canary.connections == 2


async def test_redirect_off_the_allowlist_is_refused(canary, fake_dns):
    answers, _lookups = fake_dns
    answers["images.test"] = [["127.0.0.1"]]
    answers["elsewhere.test"] = [["127.0.0.1"]]
    canary.routes["/start"] = redirect("http://elsewhere.test:{port}/image.png")
    config = LOOPBACK_OK.model_copy(update={"allowed_domains": ("images.test",)})
    await expect_refusal(f"http://images.test:{canary.port}/start", config, InvalidRequestError,
                         "image_url_not_allowed")
    assert canary.connections == 1


async def test_port_allowlist(canary):
    config = LOOPBACK_OK.model_copy(update={"allowed_ports": (443,)})
    await expect_refusal(canary.url("/image.png"), config, InvalidRequestError, "image_url_not_allowed")
    assert canary.connections == 0


def test_config_rejects_non_canonical_domains():
    with pytest.raises(ValueError):
        UrlFetchConfig(allowed_domains=("Images.Example.com",))
