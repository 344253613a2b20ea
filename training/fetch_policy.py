"""Which URLs the product fetches on a user's behalf: public http(s) hosts only.

Why: a dataset's `base_url` is typed by a user but fetched by the server. Unchecked, a URL
naming 127.0.0.1, a cloud metadata address (169.254.169.254) or `file:///some/dir` makes the
server call its own services or copy its own files into a dataset the user can read
(server-side request forgery). So:

- only `http` and `https`;
- every address the host resolves to must be public: private, loopback, link-local,
  multicast, reserved, unspecified and other non-global addresses are refused, also when they
  hide inside an IPv6 address (IPv4-mapped, 6to4, Teredo, NAT64) — unless an admin names the
  host (any port) or `host:port` in the allow-list (`NANOCHAT_FETCH_ALLOWED_HOSTS`, comma-
  separated; the web app's setting `FETCH_ALLOWED_HOSTS` and the env var its worker passes to
  the programs). Entries match the host as written in the URL, not what it resolves to.

The check is made twice. The web app calls `check_url` when a URL is submitted, so the user
gets a field error at once. The program fetches with `open_url`, which re-checks at connect
time and connects only to an address it has just checked (DNS may answer differently the
second time), checks every redirect hop, and has no handler for any other scheme. It does not
use `http_proxy`/`https_proxy`: through a proxy the addresses could not be checked.

Pure (no Django), so the training programs and a shell use it as they are.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

ENV_VAR = "NANOCHAT_FETCH_ALLOWED_HOSTS"
DEFAULT_PORTS = {"http": 80, "https": 443}

# IPv6 ranges that carry an IPv4 address in their last 32 bits (NAT64 well-known prefix).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchRefused(ValueError):
    """A URL or address the policy refuses; the message says why in one line."""


class HostUnresolved(FetchRefused):
    """`check_url` could not resolve the host, so could not judge it (may be transient)."""


def allowed_from_env(environ: dict[str, str] | None = None) -> frozenset[str]:
    """The allow-list in `NANOCHAT_FETCH_ALLOWED_HOSTS` (comma-separated hosts or host:port)."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return normalize_allowed(raw.split(","))


def normalize_allowed(entries: Iterable[str]) -> frozenset[str]:
    """Allow-list entries compared case-insensitively, blanks dropped."""
    return frozenset(e.strip().lower() for e in entries if e.strip())


def _host_keys(host: str, port: int) -> set[str]:
    # The forms an admin may write for this host: name, name:port, [v6], [v6]:port.
    host = host.lower().strip("[]")
    if ":" in host:
        return {host, f"[{host}]", f"[{host}]:{port}"}
    return {host, f"{host}:{port}"}


def is_allowed_host(host: str, port: int, allowed: Iterable[str]) -> bool:
    """Whether the admin allow-list names `host` or `host:port`."""
    return not _host_keys(host, port).isdisjoint(normalize_allowed(allowed))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_problem(address: str | IPAddress) -> str | None:
    """Why an address is not a public one ("loopback", "private", ...), or None when it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            problem = address_problem(inner)
            return f"{problem} IPv4 ({inner}) inside an IPv6" if problem else None
    for problem, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-public", not ip.is_global),
    ):
        if flag:
            return problem
    return None


def check_addresses(host: str, port: int, addresses: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise FetchRefused unless the host is allow-listed or every address is public."""
    if is_allowed_host(host, port, allowed):
        return
    for address in addresses:
        problem = address_problem(address)
        if problem:
            shown = host if host == address else f"{host} ({address})"
            raise FetchRefused(
                f"{shown} is a {problem} address: downloads go only to public hosts "
                f"unless an admin adds the host to {ENV_VAR}"
            )


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; FetchRefused for any other scheme or shape."""
    if not isinstance(url, str) or not url.strip():
        raise FetchRefused("is not a URL")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(f"is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        shown = f"{scheme}:" if scheme else "a URL without a scheme"
        raise FetchRefused(f"{shown} is not allowed: use an http:// or https:// URL")
    if not parts.hostname:
        raise FetchRefused(f"{url} names no host")
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        raise FetchRefused(f"{host!r} is not a valid host name") from None


def check_url(url: str, allowed: Iterable[str] | None = None) -> None:
    """Refuse (FetchRefused) a URL the product must not fetch; resolves the host's addresses.

    `allowed` defaults to the `NANOCHAT_FETCH_ALLOWED_HOSTS` environment variable.
    """
    allowed = allowed_from_env() if allowed is None else allowed
    _, host, port = split_url(url)
    if is_allowed_host(host, port, allowed):
        return
    try:
        infos = _resolve(host, port)
    except (OSError, ValueError) as exc:
        raise HostUnresolved(f"host {host!r} does not resolve ({exc})") from None
    check_addresses(host, port, [info[4][0] for info in infos], allowed)


def _connect(
    address: tuple[str, int], timeout: Any = None, source_address: Any = None, *,
    allowed: frozenset[str],
) -> socket.socket:  # fmt: skip
    """socket.create_connection that connects only to addresses it has just checked."""
    host, port = address
    infos = _resolve(host, port)
    check_addresses(host, port, [info[4][0] for info in infos], allowed)
    error: OSError | None = None
    for *_, sockaddr in infos:
        try:
            return socket.create_connection((sockaddr[0], port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error or OSError(f"{host}: no address to connect to")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, allowed: frozenset[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        # http.client opens its socket through this attribute (for HTTPS too, before TLS).
        self._create_connection = functools.partial(_connect, allowed=allowed)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, allowed: frozenset[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect, allowed=allowed)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allowed: frozenset[str]):
        super().__init__()
        self._allowed = allowed

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, allowed=self._allowed), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allowed: frozenset[str]):
        super().__init__()
        self._allowed = allowed

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_HTTPSConnection, allowed=self._allowed)
        return self.do_open(connection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:  # fmt: skip
        # The target's addresses are checked when its connection opens; the scheme here.
        split_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def open_url(
    url: str, timeout: float, allowed: Iterable[str] | None = None, *,
    data: bytes | None = None, headers: dict[str, str] | None = None,
    follow_redirects: bool = True,
) -> http.client.HTTPResponse:  # fmt: skip
    """urlopen for a URL that passes the policy, at every hop and every connection.

    `allowed` defaults to the `NANOCHAT_FETCH_ALLOWED_HOSTS` environment variable. With
    `data` the request is a POST of those bytes (the alerts' webhooks); with
    `follow_redirects=False` a 3xx answer raises HTTPError like any other non-2xx status,
    since a POST that a redirect turns into a GET would be sent nowhere useful.
    Raises FetchRefused (a ValueError) when the policy refuses, else what urlopen raises.
    """
    allowed = allowed_from_env() if allowed is None else normalize_allowed(allowed)
    split_url(url)
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(), _HTTPHandler(allowed), _HTTPSHandler(allowed),
    ]  # fmt: skip
    if follow_redirects:
        handlers.append(_RedirectHandler())
    for handler in handlers:
        opener.add_handler(handler)
    request = urllib.request.Request(url, data=data, headers=headers or {})
    return opener.open(request, timeout=timeout)
