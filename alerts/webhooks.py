"""Webhook URLs: which ones a user may save, and posting a JSON body to one.

A webhook is a URL typed by a user and called by the server, so it is a request-forgery risk
like a dataset's download URL and follows the same policy (training/fetch_policy.py): http(s)
only, and every address the host resolves to must be public unless the admin names the host
in ALERT_WEBHOOK_ALLOWED_HOSTS. The check runs when the URL is saved (a field error at once)
and again before every send, whose connection goes only to an address just checked (DNS may
answer differently the second time). Redirects are not followed: a redirected POST would be
re-checked nowhere and turned into a GET anyway.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
from collections.abc import Iterable
from typing import Any

from training.fetch_policy import (
    FetchRefused,
    address_problem,
    is_allowed_host,
    open_url,
    split_url,
)

SETTING = "ALERT_WEBHOOK_ALLOWED_HOSTS"
USER_AGENT = "nanochat-alerts/1"
MAX_ANSWER_BYTES = 4096  # of a receiver's answer, read for the delivery log
# Answers worth another attempt: the receiver is down, overloaded or asks us to slow down.
RETRY_STATUSES = {408, 425, 429}


class WebhookRefused(ValueError):
    """A URL the policy refuses; the message says why in one line (no retry can help)."""


class DeliveryError(Exception):
    """A send that did not succeed; `retry` says whether another attempt may."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def check_url(url: str, allowed: Iterable[str], max_length: int) -> None:
    """Raise WebhookRefused unless `url` is an http(s) URL to a public (or allowed) host.

    A host that does not resolve is refused too (a typo is caught when saved); HostUnresolved
    at send time is retried instead, since DNS outages pass.
    """
    if not isinstance(url, str) or not url.strip():
        raise WebhookRefused("enter a URL")
    if len(url) > max_length:
        raise WebhookRefused(f"use at most {max_length} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookRefused("must not contain spaces or control characters")
    try:
        _, host, port = split_url(url)
    except FetchRefused as exc:
        raise WebhookRefused(str(exc)) from None
    if urllib.parse.urlsplit(url).username is not None:
        raise WebhookRefused("put no user name or password in the URL")
    _check_host(host, port, allowed)


def _check_host(host: str, port: int, allowed: Iterable[str]) -> None:
    if is_allowed_host(host, port, allowed):
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise WebhookRefused(f"host {host!r} does not resolve ({exc})") from None
    for *_, sockaddr in infos:
        problem = address_problem(sockaddr[0])
        if problem:
            shown = host if host == sockaddr[0] else f"{host} ({sockaddr[0]})"
            raise WebhookRefused(
                f"{shown} is a {problem} address: webhooks go only to public hosts unless "
                f"an admin adds the host to {SETTING}"
            )


def post_json(url: str, body: dict[str, Any], timeout: float, allowed: Iterable[str]) -> str:
    """POST `body` as JSON to `url`; the answer's status line for the log, or DeliveryError.

    2xx is success. 5xx, 408/425/429 and network errors may succeed later (retry); any other
    answer, a redirect, or a refused address will not.
    """
    try:
        _, host, port = split_url(url)
        _check_host(host, port, allowed)
    except FetchRefused as exc:
        raise DeliveryError(str(exc), retry=False) from None
    except WebhookRefused as exc:
        raise DeliveryError(str(exc), retry="does not resolve" in str(exc)) from None
    data = json.dumps(body, allow_nan=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    try:
        with open_url(
            url, timeout, allowed, data=data, headers=headers, follow_redirects=False
        ) as answer:
            answer.read(MAX_ANSWER_BYTES)
            return f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        detail = _answer_text(exc)
        message = f"HTTP {exc.code}{': ' + detail if detail else ''}"
        if 300 <= exc.code < 400:
            message += " (a redirect: use the URL it points to)"
        raise DeliveryError(message, retry=exc.code >= 500 or exc.code in RETRY_STATUSES) from None
    except FetchRefused as exc:  # the address changed between the check and the connection
        raise DeliveryError(str(exc), retry=False) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"could not connect: {reason}", retry=True) from None


def _answer_text(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read(MAX_ANSWER_BYTES).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the body is only for the log
        return ""
    finally:
        exc.close()
    return " ".join(text.split())[:200]
