"""Keep secrets out of logs and metric labels: a URL's password becomes ``***``.

    >>> redact_url("redis://:s3cret@redis:6379/0")
    'redis://:***@redis:6379/0'
    >>> redact("cannot reach rediss://app:s3cret@10.0.0.5:6380/0: timeout")
    'cannot reach rediss://app:***@10.0.0.5:6380/0: timeout'
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://[user]:password@  — the password runs up to the last '@' before the host
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:)(?P<pw>\S*)@")
# ?password=... or &password=... in a query string
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pass|token|secret)=)(?P<pw>[^&\s#]*)",
                    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every URL password (userinfo or a ``password=`` query) masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK if m['pw'] else ''}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_url(url: str) -> str:
    """A URL fit to print: its password, if any, masked."""
    return redact(url)
