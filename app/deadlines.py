"""Times by which a thread must be done reading a request off its socket.

gunicorn's threads read a request's line, headers and body from blocking sockets with no
timeout. A client that stops in the middle (a publisher that died, a network cut with no
reset) or sends a byte now and then holds the thread for as long as it likes, and with
as many such clients as threads a worker answers nothing, /health included. A socket
timeout bounds only the wait for each byte, not the whole read; and gunicorn parses the
headers before the app runs. So one watcher thread per process ends the reads that are
late: it shuts the socket down for reading, and the blocked recv() returns as at an end
of stream. Writing stays open, so the reader can still answer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# The progress a slow client must make within each limit, sending a body (within
# AGGREGATOR_BODY_TIMEOUT) or taking an answer (AGGREGATOR_SEND_TIMEOUT): 64 KiB a minute
# by default, about 1 KiB/s, the floor a client on the slowest link stays above.
STEP = 64 * 1024


class Deadline:
    """One socket's read, due within seconds of its start or of its last renew()."""

    def __init__(self, watcher: Watcher, sock: socket.socket, seconds: float,
                 on_expire: Callable[[socket.socket], None] | None):
        self._watcher = watcher
        self.sock = sock
        self.seconds = seconds
        self.on_expire = on_expire
        self.due = time.monotonic() + seconds
        self.expired = False

    def renew(self) -> None:
        """Give the read another `seconds` from now (it is making progress)."""
        self.due = time.monotonic() + self.seconds

    def cancel(self) -> bool:
        """Stop watching; return False if the read had already been ended as late."""
        return self._watcher.cancel(self)


class Watcher:
    """The process's deadlines, and the thread that ends the reads past theirs."""

    def __init__(self):
        self._changed = threading.Condition()
        self._live: set[Deadline] = set()
        self._wake_at = math.inf
        self._pid: int | None = None

    def watch(self, sock: socket.socket, seconds: float,
              on_expire: Callable[[socket.socket], None] | None = None) -> Deadline:
        """Watch a read of sock that must be done within seconds (renew() extends it).
        When it is late, on_expire(sock) is called first (say, to write an answer; it must
        not block), then reading is shut down. The owner must cancel() before it closes
        the socket: the watcher touches it only while it is watched."""
        deadline = Deadline(self, sock, seconds, on_expire)
        with self._changed:
            if self._pid != os.getpid():  # first use in this process (gunicorn forks)
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="deadlines", daemon=True).start()
            self._live.add(deadline)
            if deadline.due < self._wake_at:
                self._changed.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> bool:
        with self._changed:
            self._live.discard(deadline)
            return not deadline.expired

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for deadline in [d for d in self._live if d.due <= now]:
                    self._live.discard(deadline)
                    deadline.expired = True
                    _end(deadline)
                # Renewed deadlines only move later, and new ones that come sooner
                # notify: sleeping until the soonest known is enough.
                self._wake_at = min((d.due for d in self._live), default=math.inf)
                self._changed.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _end(deadline: Deadline) -> None:
    """Call the late read's on_expire, then shut its socket down for reading, whatever the
    callback did: that is what frees the reader."""
    if deadline.on_expire is not None:
        try:
            deadline.on_expire(deadline.sock)
        except OSError:
            pass  # no room to write, or the client went away: closing is answer enough
        except Exception:  # never let one bad callback stop the watcher
            log.exception("answering a late read failed")
    with contextlib.suppress(OSError):  # not connected any more: its recv ends anyway
        deadline.sock.shutdown(socket.SHUT_RD)


WATCHER = Watcher()
