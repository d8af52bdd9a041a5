"""What a feed added over HTTP (``POST /sources``) may touch: the one policy, used by the
gateway when the feed is added and by the supervisor again before every connection.

A feed registered from the host (`spotline sources add`, `spotline publish`, the Python API)
is the operator's own and is not bound by it. A feed added over HTTP may name:

- a local file or folder only inside ``feed_roots``, checked after resolving symlinks and
  ``..`` (empty, the default: no local paths at all);
- a URL only with a scheme of ``feed_schemes`` whose host resolves to public addresses only
  (every address ``getaddrinfo`` gives): loopback, link-local, private, shared, multicast,
  unspecified and reserved addresses are refused unless ``feed_allow_private``. The supervisor
  resolves the name again right before it opens the feed (and before each reconnect), so a name
  that later resolves elsewhere (DNS rebinding) is refused then;
- a camera (an index such as ``0``, or ``/dev/video*``) only if ``feed_allow_cameras``;

and is capped: ``feed_max_spec_chars`` characters of spec, ``max_captions`` captions of at
most ``max_caption_chars`` characters each, ``max_feeds`` feeds in the registry.

Refusals are ``FeedRefused`` (an ``InputError``) with the HTTP status to answer and a message
that names the setting to change; URLs in messages are redacted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..common.errors import InputError
from ..common.redact import redact_url
from ..common.settings import Settings

Resolver = Callable[[str, int | None], list[str]]
# characters that no feed spec needs and that URL parsers disagree about
_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f", "\\"}


class FeedRefused(InputError):
    """A feed spec the policy does not allow; ``status`` is the HTTP answer (400, 403, 409)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def resolve(host: str, port: int | None) -> list[str]:
    """Every address a host name resolves to (``getaddrinfo``); InputError when none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise FeedRefused(f"cannot resolve host {host!r}: {exc}", 400) from None
    return sorted({str(info[4][0]) for info in infos})


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def is_camera(spec: str) -> bool:
    """A camera index (``0``) or a video device (``/dev/video*``, after resolving links)."""
    if spec.isdigit():
        return True
    return os.path.realpath(spec).startswith("/dev/video") if spec.startswith("/") else False


def address_refused(addr: str) -> str | None:
    """Why an address may not be reached without ``feed_allow_private`` (None: it may)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])  # an IPv6 zone id is not the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return what
    return None if ip.is_global else "non-public"


@dataclass(frozen=True)
class FeedPolicy:
    """The rules for feeds added over HTTP (``from_settings``)."""

    roots: tuple[str, ...] = ()
    schemes: frozenset[str] = frozenset({"rtsp", "rtsps", "http", "https"})
    allow_private: bool = False
    allow_cameras: bool = False
    max_spec_chars: int = 2048
    max_captions: int = 32
    max_caption_chars: int = 512
    max_feeds: int = 64
    resolver: Resolver = resolve

    @classmethod
    def from_settings(cls, s: Settings, resolver: Resolver = resolve) -> FeedPolicy:
        return cls(roots=tuple(os.path.realpath(os.path.expanduser(r))
                               for r in _split(s.feed_roots)),
                   schemes=frozenset(x.lower() for x in _split(s.feed_schemes)),
                   allow_private=s.feed_allow_private, allow_cameras=s.feed_allow_cameras,
                   max_spec_chars=s.feed_max_spec_chars, max_captions=s.max_captions,
                   max_caption_chars=s.max_caption_chars, max_feeds=s.max_feeds,
                   resolver=resolver)

    # --- what the gateway checks when a feed is added ---------------------------------------
    def check_request(self, spec: str, captions: Sequence[str]) -> None:
        """Caps on the spec and captions, then ``check_target``."""
        if len(spec) > self.max_spec_chars:
            raise FeedRefused(f"spec of {len(spec)} characters: at most {self.max_spec_chars} "
                              "(setting feed_max_spec_chars)", 400)
        if len(captions) > self.max_captions:
            raise FeedRefused(f"{len(captions)} captions: at most {self.max_captions} a feed "
                              "(setting max_captions)", 400)
        longest = max((len(c) for c in captions), default=0)
        if longest > self.max_caption_chars:
            raise FeedRefused(f"a caption of {longest} characters: at most "
                              f"{self.max_caption_chars} (setting max_caption_chars)", 400)
        self.check_target(spec)

    def check_count(self, registered: int) -> None:
        """Refuse one more feed when the registry holds ``max_feeds`` already."""
        if registered >= self.max_feeds:
            raise FeedRefused(f"the registry holds {registered} feeds: at most "
                              f"{self.max_feeds} (setting max_feeds); remove one first", 409)

    # --- what both the gateway and the supervisor check ------------------------------------
    def check_target(self, spec: str) -> None:
        """Whether the feed may open what the spec names (raises FeedRefused)."""
        if any(c in _CONTROL for c in spec) or ("://" in spec and any(c.isspace() for c in spec)):
            raise FeedRefused("spec holds a control character, a backslash or (in a URL) "
                              "whitespace", 400)
        if "://" in spec:
            self.check_url(spec)
        elif is_camera(spec):
            if not self.allow_cameras:
                raise FeedRefused(f"camera {spec!r}: feeds added over HTTP may not open the "
                                  "host's cameras (setting feed_allow_cameras)")
        else:
            self.check_path(spec)

    def check_path(self, spec: str) -> str:
        """The resolved path of a local file or folder inside ``roots`` (else FeedRefused)."""
        if not self.roots:
            raise FeedRefused(f"local path {spec!r}: feeds added over HTTP may not read local "
                              "files (setting feed_roots: the folders they may read)")
        if not os.path.isabs(spec):
            raise FeedRefused(f"local path {spec!r}: give an absolute path inside feed_roots",
                              400)
        if not self.inside_roots(spec):  # symlinks and '..' resolved first
            raise FeedRefused(f"local path {spec!r} is outside feed_roots (after resolving "
                              f"links and ..: {os.path.realpath(spec)!r}); allowed: "
                              f"{', '.join(self.roots)}")
        return os.path.realpath(spec)

    def inside_roots(self, path: str | os.PathLike[str]) -> bool:
        """Whether a path, links and ``..`` resolved, lies inside one of ``roots``."""
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(root) for root in self.roots)

    def check_url(self, spec: str) -> list[str]:
        """The addresses a URL's host resolves to, every one allowed (else FeedRefused)."""
        shown = redact_url(spec, drop_user=True)
        scheme = spec.partition("://")[0].lower()
        if scheme not in self.schemes:
            raise FeedRefused(f"{shown}: scheme {scheme!r} is not allowed for feeds added over "
                              f"HTTP (setting feed_schemes: {', '.join(sorted(self.schemes))})")
        try:
            parts = urlsplit(spec)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise FeedRefused(f"{shown}: not a valid URL ({exc})", 400) from None
        if not host:
            raise FeedRefused(f"{shown}: no host", 400)
        if self.allow_private:
            return []
        addresses = self.resolver(host, port)
        if not addresses:
            raise FeedRefused(f"{shown}: host {host!r} resolves to no address", 400)
        for addr in addresses:
            why = address_refused(addr)
            if why:
                raise FeedRefused(f"{shown}: host {host!r} resolves to {addr}, a {why} "
                                  "address; feeds added over HTTP may reach public addresses "
                                  "only (setting feed_allow_private)")
        return addresses
