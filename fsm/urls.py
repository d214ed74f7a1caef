"""The http(s) URLs the settings take (a downstream service's base URL, the fallback
services, the OpenID Connect issuer), parsed rather than matched on a prefix: `http://`
alone, a port out of range or a host with a space in it is refused at start-up, not met
as a failing call later. Each check raises ValueError saying what is wrong, never quoting
the URL (it may hold a secret). No I/O: a host is checked for its form, not resolved.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

# One label of a host name: letters, digits, hyphens inside; underscores too (container
# and compose service names have them, and resolvers take them).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
# The hosts an http:// issuer may have: this machine (a test or development provider).
_LOOPBACK_NAMES = frozenset({"localhost"})


def http_base_url(url: str) -> str:
    """`url` without its trailing slashes, if a client can call paths under it: http or
    https, a valid host, a port from 1 to 65535 if any, no user or password (a URL's
    secret would end up in error messages and logs), no query or fragment (a path
    appended to it would land inside them)."""
    parts = _parts(url, ("http", "https"), "must be an http:// or https:// URL")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must have no query (?…) or fragment (#…): paths are appended to it")
    return url.rstrip("/")


def issuer_url(url: str) -> str:
    """`url` without its trailing slashes, if it is an OpenID Connect issuer (Discovery
    §3: https, a host, an optional port and path, no query or fragment; no credentials).
    http only for a provider on this machine (a local test issuer)."""
    https_only = "must be an https:// URL (http:// only for a local test issuer)"
    parts = _parts(url, ("http", "https"), https_only)
    if parts.scheme == "http" and not _loopback(parts.hostname or ""):
        raise ValueError(https_only)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must have no query (?…) or fragment (#…), as OpenID Connect requires")
    return url.rstrip("/")


def _parts(url: str, schemes: tuple[str, ...], wrong_scheme: str) -> SplitResult:
    if _CONTROL_OR_SPACE.search(url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in schemes or not url.lower().startswith(f"{parts.scheme}://"):
        raise ValueError(wrong_scheme)
    if "@" in parts.netloc:
        raise ValueError(
            "must not hold a user or password (user:password@host): a URL's secret ends up "
            "in error messages and logs"
        )
    if not _valid_host(parts):
        raise ValueError("has no valid host")
    valid_port(parts)
    return parts


def valid_port(parts: SplitResult) -> int | None:
    """The URL's port (None: the scheme's), if it is a number from 1 to 65535."""
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return port


def _valid_host(parts: SplitResult) -> bool:
    """An IP address (IPv6 in brackets) or a host name of valid labels."""
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])  # a zone id (%eth0) aside
        except ValueError:
            return False
        return True
    if not host or len(host) > 253:
        return False
    try:
        host = host.encode("idna").decode("ascii")  # an international name: its ASCII form
    except UnicodeError:
        return False
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):  # 10.0.0.1, not 999.1.1.1 nor 10.1
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(_LABEL.fullmatch(label) for label in labels)


def _loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
