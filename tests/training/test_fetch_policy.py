"""The download policy: only public http(s) hosts, unless the admin allow-list names the host.

Addresses are judged after resolution, so every spelling of a loopback or private address
(decimal, hex, octal, short forms, IPv4 inside IPv6, a user-info prefix) is refused alike; the
fetch itself re-checks at connect time and on every redirect, against real local servers.
"""

import functools
import http.server
import re
import threading
import urllib.error

import pytest

from training import fetch_policy
from training.fetch_policy import FetchRefused, HostUnresolved, check_url, open_url

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.0.0.1:8000/x", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT: neither private nor global
    ("http://240.0.0.1/", "reserved"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::ffff:127.0.0.1]/", "loopback IPv4 (127.0.0.1) inside an IPv6"),
    ("http://[::ffff:10.0.0.1]/", "private IPv4 (10.0.0.1) inside an IPv6"),
    ("http://[2002:7f00:1::1]/", "loopback IPv4 (127.0.0.1) inside an IPv6"),  # 6to4
    (
        "http://[64:ff9b::a9fe:a9fe]/",
        "link-local IPv4 (169.254.169.254) inside an IPv6",
    ),  # NAT64 of 169.254.169.254
    # Other spellings of 127.0.0.1 that the resolver accepts.
    ("http://2130706433/", "loopback"),
    ("http://0x7f.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    # User info before the host: the host is what follows the last "@".
    ("http://good.example@127.0.0.1/", "loopback"),
    ("http://8.8.8.8:80@127.0.0.1/", "loopback"),
    ("HTTP://LOCALHOST/", "loopback"),
]


@pytest.mark.parametrize(("url", "problem"), REFUSED)
def test_non_public_addresses_are_refused_whatever_their_spelling(url, problem):
    with pytest.raises(FetchRefused, match=re.escape(f"is a {problem} address")):
        check_url(url, allowed=())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "file: is not allowed: use an http:// or https:// URL"),
        ("FILE:///etc", "file: is not allowed"),
        ("ftp://8.8.8.8/x", "ftp: is not allowed"),
        ("gopher://8.8.8.8:70/_x", "gopher: is not allowed"),
        ("data:text/plain,hello", "data: is not allowed"),
        ("8.8.8.8/shards", "a URL without a scheme is not allowed"),
        ("http:///shards", "names no host"),
        ("http://8.8.8.8:99999/", "is not a valid URL"),
        ("", "is not a URL"),
    ],
)
def test_other_schemes_and_shapes_are_refused_before_any_lookup(url, message):
    with pytest.raises(FetchRefused, match=message) as info:
        check_url(url, allowed=("8.8.8.8", "localhost"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/",
        "https://1.1.1.1:8443/shards/",
        "https://[2001:4860:4860::8888]/",
        "http://127.0.0.1@8.8.8.8/",  # the host is 8.8.8.8
    ],
)
def test_public_addresses_pass(url):
    check_url(url, allowed=())


def test_the_allow_list_names_a_host_or_a_host_and_port():
    check_url("http://127.0.0.1:9000/", allowed=["127.0.0.1"])
    check_url("http://127.0.0.1:9000/", allowed=[" 127.0.0.1:9000 "])
    check_url("http://MIRROR.internal:9000/", allowed=["mirror.INTERNAL:9000"])  # no lookup
    check_url("http://[::1]:9000/", allowed=["[::1]:9000"])
    check_url("http://[::1]/", allowed=["::1"])
    check_url("https://10.0.0.1/", allowed=["10.0.0.1:443"])  # the scheme's default port
    with pytest.raises(FetchRefused, match="loopback"):
        check_url("http://127.0.0.1:9001/", allowed=["127.0.0.1:9000"])
    with pytest.raises(FetchRefused, match="private"):
        check_url("http://10.0.0.1/", allowed=["10.0.0.1:443"])
    # Entries match the host as written: another spelling of an allowed address is not allowed.
    with pytest.raises(FetchRefused, match="loopback"):
        check_url("http://2130706433:9000/", allowed=["127.0.0.1"])
    with pytest.raises(FetchRefused, match="file: is not allowed"):
        check_url("file://127.0.0.1/etc", allowed=["127.0.0.1"])


def test_the_allow_list_comes_from_the_environment_by_default(monkeypatch):
    env = {fetch_policy.ENV_VAR: " 127.0.0.1:9000, ,Mirror.Internal "}
    assert fetch_policy.allowed_from_env(env) == {"127.0.0.1:9000", "mirror.internal"}
    monkeypatch.setenv(fetch_policy.ENV_VAR, "127.0.0.1:9000")
    check_url("http://127.0.0.1:9000/")
    monkeypatch.delenv(fetch_policy.ENV_VAR)
    with pytest.raises(FetchRefused, match="NANOCHAT_FETCH_ALLOWED_HOSTS"):
        check_url("http://127.0.0.1:9000/")


def test_a_host_that_does_not_resolve_is_refused_as_unresolved():
    with pytest.raises(HostUnresolved, match="'no-such-host.invalid' does not resolve"):
        check_url("http://no-such-host.invalid/", allowed=())


# ---- fetching, against real local servers -------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers "ok", or redirects every request to `server.redirect` when that is set."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.server.redirect:
            self.send_response(302)
            self.send_header("Location", self.server.redirect)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(redirect: str = "") -> http.server.ThreadingHTTPServer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler))
        server.requests, server.redirect = [], redirect
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_open_url_fetches_from_an_allowed_host_only(serve):
    server = serve()
    port = server.server_port
    with open_url(f"http://127.0.0.1:{port}/a", 5, allowed=[f"127.0.0.1:{port}"]) as resp:
        assert resp.read() == b"ok"
    with pytest.raises(FetchRefused, match="loopback"):
        open_url(f"http://127.0.0.1:{port}/b", 5, allowed=())
    # A name is judged at connect time by the addresses it resolves to.
    with pytest.raises(FetchRefused, match=r"localhost \(.*\) is a loopback address"):
        open_url(f"http://localhost:{port}/c", 5, allowed=[f"127.0.0.1:{port}"])
    with pytest.raises(FetchRefused, match="file: is not allowed"):
        open_url("file:///etc/passwd", 5, allowed=["127.0.0.1"])
    assert server.requests == ["/a"]


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.1:{port}/secret", "http://localhost:{port}/secret",
     "http://2130706433:{port}/secret", "http://[::ffff:127.0.0.1]:{port}/secret"],
)  # fmt: skip
def test_a_redirect_to_a_host_that_is_not_allowed_is_refused(serve, target):
    inner = serve()
    outer = serve(redirect=target.format(port=inner.server_port))
    url = f"http://127.0.0.1:{outer.server_port}/shard"
    with pytest.raises(FetchRefused, match="loopback"):
        open_url(url, 5, allowed=[f"127.0.0.1:{outer.server_port}"])
    assert outer.requests == ["/shard"]
    assert inner.requests == []


def test_a_redirect_to_another_scheme_is_refused(serve):
    # urllib itself refuses a redirect to file:; ftp: it would follow, the policy refuses.
    outer = serve(redirect="file:///etc/passwd")
    with pytest.raises(
        urllib.error.HTTPError, match="Redirection to url 'file:///etc/passwd' is not"
    ):
        open_url(f"http://127.0.0.1:{outer.server_port}/", 5, allowed=["127.0.0.1"])
    outer.redirect = "ftp://127.0.0.1/etc/passwd"
    with pytest.raises(FetchRefused, match="ftp: is not allowed"):
        open_url(f"http://127.0.0.1:{outer.server_port}/", 5, allowed=["127.0.0.1"])


def test_a_redirect_between_allowed_hosts_is_followed(serve):
    inner = serve()
    outer = serve(redirect=f"http://127.0.0.1:{inner.server_port}/moved")
    with open_url(f"http://127.0.0.1:{outer.server_port}/", 5, allowed=["127.0.0.1"]) as resp:
        assert resp.read() == b"ok"
    assert inner.requests == ["/moved"]


def test_http_errors_still_raise_as_urlopen_does(serve):
    server = serve(redirect="/loop")  # redirects to itself until urllib gives up
    with pytest.raises(urllib.error.HTTPError, match="redirect"):
        open_url(f"http://127.0.0.1:{server.server_port}/loop", 5, allowed=["127.0.0.1"])
