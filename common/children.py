"""Child processes that never outlive their parent.

On Linux a child started with ``preexec_fn=die_with_parent()`` asks the kernel
(``prctl(PR_SET_PDEATHSIG, SIGTERM)``) for a SIGTERM the moment its parent dies, however the
parent died (SIGKILL included): workers then finish their batch and exit, redis-server shuts
down. The kernel sends the signal when the *thread* that started the child ends, not the
process, so only a child started from the main thread is armed: one started from a short-lived
thread (a timer, a request handler) would be killed as soon as that thread returned. Children
started elsewhere rely on their parent's own shutdown path, as on other platforms.

Elsewhere (macOS) there is no such call: ``die_with_parent()`` is None and children are only
stopped by the parent's own shutdown path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _prctl = _libc.prctl
        _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
        _prctl.restype = ctypes.c_int
    except (OSError, AttributeError):  # no libc to load: parents stop children themselves
        _prctl = None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive ``sig`` when its parent dies (Linux), or
    None where the platform cannot. Resolved in the parent, so the child only makes the call."""
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = _prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nobody would signal
            os.kill(os.getpid(), sig)

    return preexec
