"""Image URLs: fetched against a real local HTTP server, including ones that misbehave on purpose."""
from __future__ import annotations

import asyncio
import gzip
import io
import ipaddress
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from captioning import fetch as fetch_module
from captioning.fetch import FetchError, FetchLimits, fetch, is_url
from captioning.images import ImageError, load_image

LOCAL = FetchLimits(timeout_s=2.0, max_bytes=200_000, max_redirects=3, allow_private=True)


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []
    encodings: list[str] = []  # the Accept-Encoding of each request

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/png", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if body or status == 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow_headers(self):
        time.sleep(6)
        self._send(200, png_bytes())

    def _late_then_silent(self):  # each step just within the limit, all of them far over it
        time.sleep(0.9)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.flush()
        time.sleep(0.9)
        self.wfile.write(b"\x89")
        self.wfile.flush()
        time.sleep(5)

    def _trickle(self):  # headers at once, then a byte every 0.2 s for a minute
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for _ in range(300):
            self.wfile.write(b"\x89")
            self.wfile.flush()
            time.sleep(0.2)

    def _endless(self):  # a body that never ends, as fast as the socket takes it
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        chunk = b"\0" * 65536
        while True:
            self.wfile.write(chunk)

    # path -> what the server does (an unknown path gets no answer at all)
    routes = {
        "/image.png": lambda self: self._send(200, png_bytes()),
        "/hop": lambda self: self._send(302, Location="/image.png"),
        "/loop": lambda self: self._send(302, Location="/loop"),
        "/to-file": lambda self: self._send(302, Location="file:///etc/passwd"),
        "/to-bad-port": lambda self: self._send(302, Location="http://127.0.0.1:99999/image.png"),
        "/to-credentials": lambda self: self._send(
            302, Location=f"http://user:secret@127.0.0.1:{self.server.server_address[1]}/image.png"),
        # 100 KB of zeros that inflate to 100 MB, sent although not asked for
        "/gzip": lambda self: self._send(200, gzip.compress(bytes(100 * 2**20), compresslevel=1),
                                         Content_Encoding="gzip"),
        "/text": lambda self: self._send(200, b"<html>not an image</html>", "text/html"),
        "/missing": lambda self: self._send(404, b"no such image", "text/plain"),
        "/slow-headers": _slow_headers,
        "/late-then-silent": _late_then_silent,
        "/trickle": _trickle,
        "/endless": _endless,
    }

    def do_GET(self):
        Handler.hosts.append(self.headers.get("Host", ""))
        Handler.encodings.append(self.headers.get("Accept-Encoding", ""))
        route = self.routes.get(self.path)
        try:
            if route:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


class IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def start(server_class, address: str):
    httpd = server_class((address, 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def server():
    httpd = start(ThreadingHTTPServer, "127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetches_an_image_and_follows_a_redirect(server):
    assert fetch(f"{server}/image.png", LOCAL) == png_bytes()
    assert load_image(fetch(f"{server}/hop", LOCAL), 16).shape == (16, 16, 3)


def test_loopback_is_refused_unless_allowed(server):
    with pytest.raises(FetchError, match="refused.*loopback") as caught:
        fetch(f"{server}/image.png", FetchLimits())
    assert caught.value.status == 403


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.10", False), ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("2002:a00:1::1", False), ("2002:808:808::1", True),
    ("fec0::1", False), ("64:ff9b::808:808", True), ("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False),
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b:1::808:808", False)])
def test_which_addresses_count_as_public(address, public):
    assert fetch_module._public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("address,public", [("64:ff9b::808:808", True), ("64:ff9b::a00:1", False)])
def test_a_nat64_answer_is_judged_by_its_ipv4_address(monkeypatch, address, public):
    """An IPv6-only host's DNS64 answers 64:ff9b::<IPv4> for an IPv4-only site: all of them were refused as
    reserved. Resolved only (nothing is connected to: these are not this machine's addresses)."""
    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", lambda host, port, *args, **kwargs: [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))])
    if public:
        assert asyncio.run(fetch_module.resolve("v6only.example.invalid", 80, allow_private=False)) == address
    else:
        with pytest.raises(FetchError, match=f"refused: .*{address}") as caught:
            asyncio.run(fetch_module.resolve("v6only.example.invalid", 80, allow_private=False))
        assert caught.value.status == 403


@pytest.fixture
def looked_up(monkeypatch) -> list[str]:
    """A DNS that answers 127.0.0.1 for every name; the names asked, in order."""
    names = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        names.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", fake_getaddrinfo)
    Handler.hosts.clear()
    return names


def test_the_connection_goes_to_the_checked_address(server, looked_up):
    # A name that no DNS knows: the fetch can only succeed by connecting to the address resolve() checked,
    # while the Host header keeps the name (as a virtual host needs).
    port = int(server.rsplit(":", 1)[1])
    assert fetch(f"http://images.example.invalid:{port}/hop", LOCAL) == png_bytes()
    # resolve() checked the name at each hop of the redirect; the HTTP client only ever saw the address.
    assert [host for host in looked_up if host != "127.0.0.1"] == ["images.example.invalid"] * 2
    assert Handler.hosts == [f"images.example.invalid:{port}"] * 2


@pytest.mark.parametrize("name,ascii_name", [("bücher.example.invalid", "xn--bcher-kva.example.invalid"),
                                              ("xn--bcher-kva.example.invalid", "xn--bcher-kva.example.invalid"),
                                              ("faß.example.invalid", "xn--fa-hia.example.invalid")])  # IDNA 2008
def test_an_internationalised_name_is_looked_up_and_sent_in_its_ascii_form(server, looked_up, name, ascii_name):
    """Was a UnicodeEncodeError (a 500 from the server) for every IDNA name: its Unicode form went into Host."""
    port = int(server.rsplit(":", 1)[1])
    assert fetch(f"http://{name}:{port}/image.png", LOCAL) == png_bytes()
    assert looked_up == [ascii_name] and Handler.hosts == [f"{ascii_name}:{port}"]


def test_a_redirect_loop_stops_at_the_limit(server):
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetch(f"{server}/loop", LOCAL)


def test_a_url_with_a_user_name_or_password_is_refused_without_showing_them(server):
    """`http://user:secret@host/x.jpg` was fetched with the password sent on as Basic auth (to whatever host a
    redirect named too), and every error about such a URL quoted the password."""
    port = int(server.rsplit(":", 1)[1])
    Handler.hosts.clear()
    for url in (f"http://user:secret@127.0.0.1:{port}/image.png", f"http://secret@127.0.0.1:{port}/image.png",
                f"https://{'secret' * 40}@127.0.0.1:{port}/image.png",  # a long token, past what errors clip
                "ftp://user:secret@127.0.0.1/x.jpg", "http://user:secret@a b/x.jpg", f"{server}/to-credentials"):
        with pytest.raises(FetchError) as caught:
            fetch(url, LOCAL)
        error = str(caught.value)
        assert caught.value.status == 400 and "secret" not in error and "***@" in error, (url, error)
    assert Handler.hosts == [f"127.0.0.1:{port}"]  # only the redirect was asked for


def test_a_redirect_to_another_scheme_is_refused(server):
    with pytest.raises(FetchError, match="only http and https") as caught:
        fetch(f"{server}/to-file", LOCAL)
    assert caught.value.status == 400


def test_a_redirect_to_a_port_out_of_range_is_refused(server):
    with pytest.raises(FetchError, match="port 99999 is not 1 to 65535") as caught:  # was an OverflowError
        fetch(f"{server}/to-bad-port", LOCAL)
    assert caught.value.status == 400


@pytest.mark.parametrize("path", ["/slow-headers", "/late-then-silent", "/trickle"])
def test_a_slow_server_is_cut_off_at_the_time_limit(server, path):
    start = time.monotonic()
    with pytest.raises(FetchError, match="longer than 1 s"):
        fetch(f"{server}{path}", FetchLimits(timeout_s=1.0, allow_private=True))
    assert time.monotonic() - start < 1.5  # one deadline for the whole fetch, not a timeout per step


def test_a_slow_dns_answer_is_cut_off_at_the_time_limit(monkeypatch):
    def slow_getaddrinfo(*args, **kwargs):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", slow_getaddrinfo)
    start = time.monotonic()
    with pytest.raises(FetchError, match="longer than 1 s"):
        fetch("http://slow-dns.example.invalid/a.jpg", FetchLimits(timeout_s=1.0))
    assert time.monotonic() - start < 1.5


def test_an_endless_body_is_cut_off_at_the_byte_limit(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="over the limit of 200000 bytes") as caught:
        fetch(f"{server}/endless", LOCAL)
    assert caught.value.status == 413
    assert time.monotonic() - start < 2.0


def test_a_declared_length_over_the_limit_is_refused_before_reading(server):
    tiny = FetchLimits(max_bytes=len(png_bytes()) - 1, allow_private=True)
    with pytest.raises(FetchError, match=f"is {len(png_bytes())} bytes, over the limit"):
        fetch(f"{server}/image.png", tiny)


def test_a_page_that_is_not_an_image_is_refused_by_the_image_loader(server):
    with pytest.raises(ImageError, match="not an image"):
        load_image(fetch(f"{server}/text", LOCAL), 16)


def test_an_error_status_is_named(server):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{server}/missing", LOCAL)


@pytest.mark.parametrize("url,message", [("ftp://example.com/a.jpg", "only http and https"),
                                         ("http:///a.jpg", "no host|not a valid URL"),
                                         ("http://xn--/a.jpg", "not a valid URL"),  # a broken IDNA name
                                         ("http://127.0.0.1:99999/a.jpg", "port 99999 is not 1 to 65535"),
                                         ("http://127.0.0.1:0/a.jpg", "port 0 is not 1 to 65535")])
def test_bad_urls_are_refused_without_a_connection(url, message):
    with pytest.raises(FetchError, match=message) as caught:
        fetch(url, LOCAL)
    assert caught.value.status == 400


def test_a_compressed_body_is_refused_unread(server):
    """Asked for identity, a server that gzips anyway is refused: the byte limit counts what arrives,
    and inflating would not be bounded by it."""
    Handler.encodings.clear()
    with pytest.raises(FetchError, match="gzip-compressed"):
        fetch(f"{server}/gzip", LOCAL)
    assert Handler.encodings == ["identity"]


def test_an_ipv6_literal_keeps_its_brackets_in_the_host_header():
    httpd = start(IPv6Server, "::1")
    try:
        port = httpd.server_address[1]
        Handler.hosts.clear()
        assert fetch(f"http://[::1]:{port}/image.png", LOCAL) == png_bytes()
        assert Handler.hosts == [f"[::1]:{port}"]
    finally:
        httpd.shutdown()


def test_a_hung_dns_lookup_holds_up_neither_the_fetch_nor_the_exit_of_the_process():
    code = ("import socket, time\nfrom captioning import fetch\n"
            "socket.getaddrinfo = lambda *args, **kwargs: time.sleep(30)\n"
            "try:\n    fetch.fetch('http://hung-dns.example.invalid/a.jpg', fetch.FetchLimits(timeout_s=1.0))\n"
            "except fetch.FetchError as err:\n    print(err)\n")
    start_time = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "longer than 1 s" in result.stdout, result.stderr[-2000:]
    assert time.monotonic() - start_time < 15  # Python's start-up and imports, not the 30-s lookup


def test_dns_lookups_in_progress_are_bounded(monkeypatch):
    release = threading.Event()
    loopback = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", lambda *args, **kwargs: release.wait(10) and loopback)
    monkeypatch.setattr(fetch_module, "_lookup_slots", threading.BoundedSemaphore(1))
    first: list = []

    def first_fetch():
        try:
            first.append(fetch("http://a.invalid/x.jpg", FetchLimits(timeout_s=5.0)))
        except FetchError as err:
            first.append(err)

    held = threading.Thread(target=first_fetch)
    held.start()
    time.sleep(0.5)  # the first lookup now holds the only slot
    with pytest.raises(FetchError, match="DNS lookups are already in progress") as caught:
        fetch("http://b.invalid/x.jpg", FetchLimits(timeout_s=5.0))
    assert caught.value.status == 503
    release.set()
    held.join(10)
    assert len(first) == 1 and first[0].status == 403  # it got its answer (loopback, refused) once released


def test_an_unknown_host_is_named():
    with pytest.raises(FetchError, match="cannot resolve host"):
        fetch("http://no-such-host.invalid/a.jpg", LOCAL)


def test_urls_and_paths_are_told_apart():
    assert is_url("https://example.com/a.jpg") and is_url("ftp://x/y")
    assert not is_url("photos/a.jpg") and not is_url("C:/photos/a.jpg")
