"""Keep secrets out of logs, listings and metric labels: a URL's password and the values of
secret-looking query keys become ``***``.

    >>> redact_url("redis://:s3cret@redis:6379/0")
    'redis://:***@redis:6379/0'
    >>> redact_url("rtsp://cam:p@ss@10.0.0.5/live?token=abc&ch=1")
    'rtsp://cam:***@10.0.0.5/live?token=***&ch=1'
    >>> redact_url("rtsp://cam:p@ss@10.0.0.5/live", drop_user=True)
    'rtsp://10.0.0.5/live'
    >>> redact("cannot reach rediss://app:s3cret@10.0.0.5:6380/0: timeout")
    'cannot reach rediss://app:***@10.0.0.5:6380/0: timeout'

A password may hold an unescaped ``@``: the user information runs to the LAST ``@`` before the
path. Query (and fragment) keys are matched case-insensitively, by name (``SECRET_KEYS``) or by
ending (``SECRET_ENDINGS``: ``refresh_token``, ``client_secret``, ``X-Amz-Security-Token``...).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"

SECRET_KEYS = frozenset({
    "token", "password", "passwd", "pass", "pwd", "secret", "access_token", "api_key", "apikey",
    "key", "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "auth", "authorization", "credential", "credentials", "session", "sessionid"})
SECRET_ENDINGS = ("token", "secret", "password", "passwd", "signature", "credential",
                  "_key", "-key", "apikey")

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]*")
# ?password=... or &token=... outside a URL (a query string on its own in a message)
_QUERY = re.compile(r"(?P<head>[?&;](?P<key>[^=&;#\s?]+)=)(?P<value>[^&;#\s]*?)"
                    r"(?=[.,:!?)\]}]*(?:[&;#\s]|$))")  # the value, not the sentence's stop


def is_secret_key(key: str) -> bool:
    """Whether a query key names a secret (case-insensitive, percent-decoded)."""
    k = unquote(key).strip().lower()
    return k in SECRET_KEYS or k.endswith(SECRET_ENDINGS)


def _mask_params(text: str) -> str:
    """``k=v`` pairs joined by ``&`` or ``;`` with the secret ones' values masked."""
    parts = re.split(r"([&;])", text)
    for i in range(0, len(parts), 2):
        key, eq, value = parts[i].partition("=")
        if eq and value and is_secret_key(key):
            parts[i] = f"{key}={MASK}"
    return "".join(parts)


def redact_url(url: str, *, drop_user: bool = False) -> str:
    """A URL fit to print: its password masked (``drop_user``: the whole ``user:password@``
    left out) and the values of secret query and fragment keys masked."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _QUERY.sub(_mask_match, url)
    slash = rest.find("/")
    head = rest if slash < 0 else rest[:slash]
    at = head.rfind("@")  # the last '@' before the path: a password may hold '@', '?' or '#'
    if at >= 0:
        user, colon, password = head[:at].partition(":")
        if drop_user:
            userinfo = ""
        elif colon:
            userinfo = f"{user}:{MASK if password else ''}@"
        else:
            userinfo = f"{user}@"
        rest = userinfo + rest[at + 1:]
        start = len(userinfo)
    else:
        start = 0
    # the query and fragment: after the first '?' or '#' past the user information
    cut = min((i for i in (rest.find("?", start), rest.find("#", start)) if i >= 0),
              default=-1)
    if cut >= 0:
        tail = re.split(r"([?#])", rest[cut:])
        rest = rest[:cut] + "".join(_mask_params(p) if i % 2 == 0 else p
                                    for i, p in enumerate(tail))
    return f"{scheme}://{rest}"


def _mask_match(m: re.Match[str]) -> str:
    if m["value"] and is_secret_key(m["key"]):
        return f"{m['head']}{MASK}"
    return m[0]


def redact(text: str) -> str:
    """``text`` with every URL in it redacted (``redact_url``) and any secret ``?key=value``
    outside a URL masked."""
    text = _URL.sub(_redact_match, text)
    return _QUERY.sub(_mask_match, text)


def _redact_match(m: re.Match[str]) -> str:
    """A URL found in text, without the punctuation that ends a sentence or a clause."""
    url = m[0].rstrip(".,;:!?)]}")
    return redact_url(url) + m[0][len(url):]
