"""gunicorn's gthread worker, with time limits on reading a request's line and headers and
on a client that takes nothing of its answer.

gunicorn parses a request's line and headers, before the app runs, from a blocking
socket with no timeout: a client that stopped in the middle of its headers, or sent a
byte of them now and then, held a thread for good (with 2 such clients on a worker of 2
threads, /health got no answer in 90 s). gunicorn has no setting for it, so this subclass
watches each request from the moment a thread takes its connection until the headers are
parsed, and answers 408 when they take longer than AGGREGATOR_HEADER_TIMEOUT.

Writing an answer had no time limit either: a client that read nothing of a large one
held its thread for as long as the connection lived. A limit on each send() alone (the
kernel's SO_SNDTIMEO, the previous fix) fell short: a send() counts as progress whatever
it queues in the kernel's send buffer, which kept growing in front of a client that read
nothing (2.8 MB in the first 5 s, then 184 KB every 5 s), so such a client was let go
after 6.2, 15.4 and 63.1 s with limits of 2, 5 and 20 s. Now the client must take (its
kernel acknowledge) STEP of an answer every AGGREGATOR_SEND_TIMEOUT seconds, as
each step of a body must arrive within AGGREGATOR_BODY_TIMEOUT: let go after 2.2, 5.2
and 20.4 s.

A request that expects `100 Continue` gets it when the app first reads its body, as from
nginx, not as soon as its headers are parsed (gunicorn's way): a client that waits for it
(curl 7.88 does, for bodies over 1 MiB) uploaded 2.6 MB of a 20 MB body before the 401 for
a wrong token or the 413 for its Content-Length, and now sends none of it.

Plain connections only: gunicorn.conf.py refuses gunicorn's own TLS, whose socket is
made in gunicorn's handle(), after these limits are set on the plain one. HTTP/1 only, as
served here: gunicorn's HTTP/2 needs the h2 library, which requirements.txt does not
install. (Were it enabled, handle_http2 would have to cancel the deadline, or the watcher
would end a long-lived HTTP/2 connection.)
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import struct
import sys
import termios
import time

from gunicorn.workers import gthread

from .config import in_force
from .deadlines import STEP, WATCHER
from .errors import raw_error

log = logging.getLogger(__name__)

_SIOCOUTQ = termios.TIOCOUTQ if sys.platform == "linux" else None  # the same ioctl on Linux


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO: a blocking send() returns what it could hand the kernel in this long, or
    fails with EAGAIN (Python's BlockingIOError) if nothing. Never 0, which means no limit."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in sock's send queue that the peer has not acknowledged (Linux's SIOCOUTQ);
    0 where that cannot be asked."""
    if _SIOCOUTQ is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


class _StepSocket(socket.socket):
    """A plain connection socket whose sendall() fails (BlockingIOError) when the client has
    taken less than STEP of it in step_timeout seconds.

    Taken means acknowledged by the client's kernel: bytes that send() queued in ours do not
    count, since a send buffer of megabytes fills up in front of a client that reads
    nothing. gunicorn writes answers with sendall(), static files included (`sendfile =
    False` in gunicorn.conf.py). A connection's socket gets this class in
    ThreadWorker.handle."""

    __slots__ = ()  # the layout of socket.socket, so that __class__ can be assigned
    step_timeout: float  # AGGREGATOR_SEND_TIMEOUT, set by ThreadWorker.init_process

    def sendall(self, data, flags: int = 0) -> None:
        with memoryview(data) as whole, whole.cast("B") as view:
            sent = taken_before = 0
            deadline = time.monotonic() + self.step_timeout
            while True:
                try:  # returns once all is queued, or at the deadline
                    _set_send_timeout(self, deadline - time.monotonic())
                    sent += self.send(view[sent:], flags)
                except BlockingIOError:
                    pass  # nothing queued by the deadline
                if sent == len(view):
                    return
                if time.monotonic() < deadline:
                    continue  # a signal cut the send() short
                # Bytes queued before this call (the headers; with pipelined requests, what
                # is left of the previous answer) and acknowledged since do not count: this
                # errs, by that much, on the strict side.
                taken = sent - _unacknowledged(self)
                if taken - taken_before < STEP:
                    raise BlockingIOError(errno.EAGAIN, "the client took too little in time")
                taken_before, deadline = taken, time.monotonic() + self.step_timeout


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _ContinueOnRead:
    """A request body (gunicorn's, wrapped) that sends the client `100 Continue` the first
    time the app reads from it."""

    def __init__(self, body, sock: socket.socket):
        self._body, self._sock = body, sock
        self.continued = False

    def _continue(self) -> None:
        if not self.continued:
            self.continued = True
            self._sock.sendall(_CONTINUE)

    def read(self, size=None):
        self._continue()
        return self._body.read(size)

    def readline(self, size=None):
        self._continue()
        return self._body.readline(size)

    def readlines(self, size=None):
        self._continue()
        return self._body.readlines(size)

    def __iter__(self):
        self._continue()
        return iter(self._body)

    def __getattr__(self, name):  # the rest of gunicorn's Body (its `failed` flag)
        return getattr(self._body, name)


def _continue_on_read(req, sock: socket.socket) -> None:
    """Defer a request's `100 Continue` until the app reads its body; if the app answers
    without reading it, close the connection after the answer (`Connection: close`).

    Closed, because a client that waits for the 100 sends no body after a final answer,
    and keep-alive would wait to drain the body first. Uses gunicorn's own flag for the
    expectation (http/message.py, as of 27.0): tests/test_hostile.py fails if it moves.
    """
    if not getattr(req, "_expected_100_continue", False):
        return
    req._expected_100_continue = False  # else gunicorn sends the 100 before the app runs
    body = req.body = _ContinueOnRead(req.body, sock)
    closes = req.should_close
    req.should_close = lambda: closes() or not body.continued


class ThreadWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker (`worker_class = "app.worker.ThreadWorker"`)."""

    def init_process(self):
        config = in_force()  # the master's, checked
        self.header_timeout, self.send_timeout = config.header_timeout, config.send_timeout
        _StepSocket.step_timeout = config.send_timeout
        super().init_process()

    def handle(self, conn):
        if type(conn.sock) is not _StepSocket:  # a new connection
            conn.sock.__class__ = _StepSocket
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
        _continue_on_read(req, conn.sock)
        try:
            return super().handle_request(req, conn)
        except BlockingIOError:  # _StepSocket.sendall
            log.info("the answer to %s: a %d KiB step of it not taken in %gs "
                     "(AGGREGATOR_SEND_TIMEOUT), closed", _address(conn.client),
                     STEP // 1024, self.send_timeout)
            return False

    def _answer_late(self, sock: socket.socket) -> None:
        """Write the 408 of a request whose headers are late (called by the watcher while
        the reader is blocked in recv: must not block)."""
        sock.send(raw_error(408, "Request Timeout", "The request line and headers did not "
                            f"arrive within {self.header_timeout:g} s "
                            "(AGGREGATOR_HEADER_TIMEOUT).", code="header_timeout"),
                  socket.MSG_DONTWAIT)


def _address(client) -> str:
    """host:port of a TCP peer as gunicorn's accept() gave it (a path for a Unix socket)."""
    if isinstance(client, (tuple, list)) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return str(client or "?")
