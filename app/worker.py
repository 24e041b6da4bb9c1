"""gunicorn's gthread worker, with time limits on reading a request's line and headers and
on a client that takes nothing of its answer.

gunicorn parses a request's line and headers, before the app runs, from a blocking
socket with no timeout: a client that stopped in the middle of its headers, or sent a
byte of them now and then, held a thread for good (with 2 such clients on a worker of 2
threads, /health got no answer in 90 s). gunicorn has no setting for it, so this subclass
watches each request from the moment a thread takes its connection until the headers are
parsed, and answers 408 when they take longer than AGGREGATOR_HEADER_TIMEOUT. Writing an
answer had no time limit either: a client that read nothing of a large one held its
thread for as long as the connection lived, so a send that makes no progress for
AGGREGATOR_SEND_TIMEOUT fails.

HTTP/1 only, as served here: gunicorn's HTTP/2 needs the h2 library, which
requirements.txt does not install. (Were it enabled, handle_http2 would have to cancel
the deadline, or the watcher would end a long-lived HTTP/2 connection.)
"""

from __future__ import annotations

import logging
import socket
import struct

from gunicorn.workers import gthread

from .config import from_env
from .deadlines import WATCHER
from .errors import raw_error

log = logging.getLogger(__name__)


class ThreadWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker (`worker_class = "app.worker.ThreadWorker"`)."""

    def init_process(self):
        config = from_env()  # checked by the master already
        self.header_timeout, self.send_timeout = config.header_timeout, config.send_timeout
        super().init_process()

    def handle(self, conn):
        if not getattr(conn, "send_timeout_set", False):
            # The kernel fails a send() that could hand nothing to a client for this long
            # (nginx's send_timeout): Python's sendall then raises BlockingIOError.
            whole = int(self.send_timeout)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack(
                "ll", whole, int((self.send_timeout - whole) * 1_000_000)))
            conn.send_timeout_set = True
        seconds = self.header_timeout
        if not (conn.initialized or conn.data_ready):
            # gunicorn first waits this long in the thread for a new connection's first
            # byte, then hands the connection back to its poller: not the client's time.
            seconds += gthread.DEFAULT_WORKER_DATA_TIMEOUT
        conn.header_deadline = WATCHER.watch(conn.sock, seconds, self._answer_late)
        try:
            return super().handle(conn)
        finally:
            # Before gunicorn may close the socket: the watcher touches only watched ones.
            if not conn.header_deadline.cancel():
                log.info("headers from %s took over %gs (AGGREGATOR_HEADER_TIMEOUT): 408, "
                         "closed", _address(conn.client), self.header_timeout)

    def handle_request(self, req, conn):
        if not conn.header_deadline.cancel():
            return False  # answered 408 already, while the last header came in: close
        try:
            return super().handle_request(req, conn)
        except BlockingIOError:  # SO_SNDTIMEO, above
            log.info("the answer to %s: nothing of it taken for %gs (AGGREGATOR_SEND_TIMEOUT), "
                     "closed", _address(conn.client), self.send_timeout)
            return False

    def _answer_late(self, sock: socket.socket) -> None:
        """Write the 408 of a request whose headers are late (called by the watcher while
        the reader is blocked in recv: must not block)."""
        if self.cfg.is_ssl:
            return  # plain bytes on a TLS connection would be garbage: only close it
        sock.send(raw_error(408, "Request Timeout", "The request line and headers did not "
                            f"arrive within {self.header_timeout:g} s "
                            "(AGGREGATOR_HEADER_TIMEOUT).", code="header_timeout"),
                  socket.MSG_DONTWAIT)


def _address(client) -> str:
    """host:port of a TCP peer as gunicorn's accept() gave it (a path for a Unix socket)."""
    if isinstance(client, (tuple, list)) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return str(client or "?")
