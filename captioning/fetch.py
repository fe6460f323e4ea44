"""Fetching an image from a URL, bounded and safe: what `caption URL` and the server's `{"url": ...}` use.

A URL given by someone else must not turn the captioner into a proxy into the local network (SSRF),
nor hold a worker forever. So: http(s) only; the host is resolved once and every address checked
(loopback, private, link-local, multicast and reserved ranges are refused unless `allow_private`);
the connection goes to that checked address (the Host header and TLS name stay the URL's, so
certificates are still verified), leaving no gap for a second, different DNS answer; redirects are
followed by hand, each hop checked the same way; and the whole fetch has a byte limit and a deadline.
The fetch is a coroutine so that the deadline is one: at it, whatever step is waiting (DNS, connect,
headers, body) is cancelled, where per-step socket timeouts would let each step take the whole limit.
Decoding (and Pillow's decompression-bomb guard) is `images.load_image`'s job, as for files.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from dataclasses import dataclass

import httpx

from captioning.errors import clipped, without_credentials

SCHEMES = ("http", "https")
MAX_LOOKUPS = 32  # DNS lookups in progress at once; a slow DNS server can hold each for its own timeout
_lookup_slots = threading.BoundedSemaphore(MAX_LOOKUPS)


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float = 10.0          # the whole fetch, DNS and redirects included
    max_bytes: int = 20 * 2**20      # the body of the image
    max_redirects: int = 3
    allow_private: bool = False      # loopback / private / link-local targets (tests on 127.0.0.1 need it)


class FetchError(Exception):
    """The URL could not be fetched; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def is_url(text: str) -> bool:
    """Whether a caption-command argument means a URL (anything with a scheme) rather than a path."""
    return "://" in text


# NAT64's well-known prefix (RFC 6052): an IPv6-only host reaches the IPv4 address in the last 32 bits through
# its network's NAT64 gateway, so DNS64 answers 64:ff9b::808:808 for a name whose only address is 8.8.8.8.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if address.version == 6:
        # An IPv6 address that carries an IPv4 one is judged by it: ::ffff:127.0.0.1 is loopback too,
        # 2002:a00:1:: is 6to4's way to 10.0.0.1 and 64:ff9b::a00:1 NAT64's (Python counts 2002::/16 and the
        # deprecated site-local fec0::/10, RFC 3879's private ranges of old, as global, and 64:ff9b::/96 as
        # reserved, which refused every public site on an IPv6-only host). The local-use NAT64 prefix
        # 64:ff9b:1::/48 stays refused: it is for a network's own gateways.
        embedded = _embedded_ipv4(address)
        if embedded is None and address.is_site_local:
            return False
        address = embedded or address
    return address.is_global and not (address.is_multicast or address.is_reserved)


async def _getaddrinfo(host: str, port: int) -> list:
    """socket.getaddrinfo, which blocks and cannot be cancelled, in a daemon thread of its own: a lookup
    that outlives its fetch's deadline holds up neither the caller nor the process's exit (the threads of
    a pool are joined at exit), nor the threads the server decodes images in. At most MAX_LOOKUPS at once."""
    slots = _lookup_slots  # the one this lookup releases, whatever the module's is by then
    if not slots.acquire(blocking=False):
        raise FetchError(f"{MAX_LOOKUPS} DNS lookups are already in progress; try again shortly", status=503)
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def settle(result, error) -> None:
        if not answer.done():  # the fetch may have given up already
            answer.set_exception(error) if error else answer.set_result(result)

    def lookup() -> None:
        try:
            outcome = (socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM), None)
        except Exception as err:  # handed to the waiting coroutine, which names it
            outcome = (None, err)
        slots.release()
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=lookup, name="resolve", daemon=True).start()
    return await answer


async def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to, after checking every address the host resolves to."""
    try:
        infos = await _getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchError(f"cannot resolve host {clipped(host)!r} ({err})") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not allow_private:
        refused = [str(a) for a in addresses if not _public(a)]
        if refused:
            raise FetchError(f"refused: {host} resolves to a loopback, private, link-local or reserved address "
                             f"({', '.join(sorted(set(refused)))}); a server started with --allow-private-urls "
                             "accepts such URLs", status=403)
    return str(addresses[0])


def _wire_host(url: httpx.URL) -> str:
    """The host as DNS, the Host header and TLS take it: an IDNA name in its ASCII (xn--) form. `url.host`
    is the Unicode form, which the Host header could not encode (every such URL was a UnicodeEncodeError)
    and which getaddrinfo would encode by the older IDNA 2003 rules, another name for some (faß.de)."""
    return url.raw_host.decode("ascii")


def _pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: str) -> httpx.Request:
    """A GET for `url` sent to `address`, with the URL's own host in the Host header and the TLS name."""
    name = _wire_host(url)
    host = f"[{name}]" if ":" in name else name  # an IPv6 literal keeps its brackets
    host_header = host if url.port is None else f"{host}:{url.port}"
    return client.build_request(
        "GET", url.copy_with(host=address),
        # identity: the byte limit is on what arrives, and a 500 KB gzip body can inflate to gigabytes
        headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"},
        extensions={"sni_hostname": name})


def _checked_url(text: str) -> httpx.URL:
    if without_credentials(text) != text:
        # httpx would send them as Basic auth to whatever host the URL, or a redirect, names, and every error quoting
        # the URL would show the password; browsers' fetch() refuses such URLs too
        raise FetchError(f"the URL holds a user name or password ({clipped(without_credentials(text))}); use a URL "
                         "that needs none, or upload the image", status=400)
    try:
        url = httpx.URL(text)
        scheme, host = url.scheme, url.host  # .host decodes an IDNA name (xn--...), which can fail
    except (httpx.InvalidURL, TypeError, ValueError) as err:  # UnicodeError (a bad IDNA name) is a ValueError
        raise FetchError(f"not a valid URL: {clipped(text)!r} ({err})", status=400) from None
    if scheme not in SCHEMES:
        raise FetchError(f"only http and https URLs can be fetched, not {clipped(scheme) or 'no scheme'}: "
                         f"{clipped(text)}", status=400)
    if not host:
        raise FetchError(f"the URL has no host: {clipped(text)}", status=400)
    if "%" in host and ":" not in host:  # ":": an IPv6 literal, whose zone (fe80::1%eth0) is no concern here
        # httpx percent-encodes what a host name cannot hold ("a b" -> "a%20b"), and that went to DNS: a 422
        # "cannot resolve host" for a URL that was never valid
        raise FetchError(f"not a valid URL: {clipped(text)!r} (a host name cannot hold {clipped(host)!r})",
                         status=400)
    if url.port is not None and not 0 < url.port < 65536:
        # httpx takes any number as a port; the socket layer then raised OverflowError (a 500, a traceback)
        raise FetchError(f"not a valid URL: {clipped(text)!r} (port {url.port} is not 1 to 65535)", status=400)
    return url


async def _read_body(response: httpx.Response, limits: FetchLimits) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(f"the server sent the image {encoding}-compressed although asked not to; "
                         "images are fetched as they are stored")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchError(f"the image is {int(declared)} bytes, over the limit of {limits.max_bytes}", status=413)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limits.max_bytes:
            raise FetchError(f"the image is over the limit of {limits.max_bytes} bytes", status=413)
    return bytes(body)


async def fetch_async(text: str, limits: FetchLimits = FetchLimits()) -> bytes:
    """The body of the image at URL `text`, or FetchError with a one-line reason; the server awaits this."""
    url = _checked_url(text)
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await _follow(url, text, limits)
    except TimeoutError:
        raise FetchError(f"the fetch took longer than {limits.timeout_s:g} s") from None


def fetch(text: str, limits: FetchLimits = FetchLimits()) -> bytes:
    """`fetch_async` for code without an event loop (the caption command)."""
    return asyncio.run(fetch_async(text, limits))


async def _follow(url: httpx.URL, text: str, limits: FetchLimits) -> bytes:
    # trust_env=False: an environment proxy would connect elsewhere than the address checked here.
    # No httpx timeout: fetch_async's deadline covers every step.
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None) as client:
        for _ in range(limits.max_redirects + 1):
            address = await resolve(_wire_host(url), url.port or (443 if url.scheme == "https" else 80),
                                    limits.allow_private)
            try:
                response = await client.send(_pinned_request(client, url, address), stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = _checked_url(str(url.join(response.headers["location"])))
                        continue
                    if response.status_code != 200:
                        raise FetchError(f"{clipped(text)} answered HTTP {response.status_code}")
                    return await _read_body(response, limits)
                finally:
                    await response.aclose()
            except httpx.HTTPError as err:
                raise FetchError(f"cannot fetch {clipped(text)} ({type(err).__name__}: {err})") from None
    raise FetchError(f"more than {limits.max_redirects} redirects fetching {clipped(text)}")
