"""URLs that may carry secrets: redacted for logs and records, and where a credential may be sent.

A base URL or tracking URI can hold a password (``https://user:pass@host``) or a token in its query string
(``?token=...``). Everything that logs or stores such a URL goes through `redact_url`; the real URL is used
only to connect. `is_loopback` tells whether a URL's host is this machine, the one place a credential may
go over plain http.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

REDACTED = "***"
LOOPBACK_NAMES = frozenset({"localhost"})


def redact_url(url: str) -> str:
    """``url`` with its userinfo, query values and fragment replaced by ``***``; the scheme, host, port,
    path and query parameter names stay, so a log line still says where a call went.

    ``https://user:pass@host:8000/v1?token=x&a=1`` -> ``https://***@host:8000/v1?token=***&a=***``.
    A string that is not a URL (no ``://``, e.g. a local path) is returned unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host: keep the scheme only
        return f"{url.split('://', 1)[0]}://{REDACTED}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(f"{item.partition('=')[0]}={REDACTED}" for item in parts.query.split("&")) if parts.query else ""
    # joined by hand: urlunsplit drops the empty authority of ``sqlite:////abs/path``
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + (
        f"#{REDACTED}" if parts.fragment else ""
    )


def with_path_suffix(url: str, suffix: str) -> str:
    """``url`` with ``suffix`` appended to its path, before any query string: ``https://h/v1?api-version=2``
    + ``/chat/completions`` -> ``https://h/v1/chat/completions?api-version=2``."""
    head, sep, query = url.partition("?")
    return head.rstrip("/") + suffix + sep + query


def is_loopback(url: str) -> bool:
    """Whether the host of ``url`` is this machine: ``localhost``, ``127.0.0.0/8`` or ``::1``."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
