"""gzip for the answers of reads (a page of events, the events page, /stats, /metrics) to a
client that accepts it, as Loki, Elasticsearch and Prometheus's own exporters do."""

from __future__ import annotations

import zlib

from flask import Flask, Response, request

# Below this, gzip's header and the CPU are not worth it (one TCP segment holds it anyway).
MIN_BYTES = 1024
# Level 1: a page of 1,000 generated events, 331 KB of JSON, goes out as 51 KB, for 1.4 to
# 2 ms more a page (README, Compression); level 6 took 2.4 times the CPU for a quarter
# fewer bytes, and that CPU is the ingest's too.
LEVEL = 1
_COMPRESSIBLE = {"application/json", "text/html", "text/plain"}


def _compressed(response: Response) -> Response:
    if response.mimetype not in _COMPRESSIBLE or request.method == "HEAD":
        return response
    response.vary.add("Accept-Encoding")  # a cache must not give this answer to any client
    if (response.direct_passthrough or response.is_streamed
            or "Content-Encoding" in response.headers
            or request.accept_encodings["gzip"] <= 0):
        return response
    body = response.get_data()
    if len(body) < MIN_BYTES:
        return response
    # wbits 31: a gzip stream (header and CRC), as Content-Encoding: gzip names it.
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, 31)
    response.set_data(packer.compress(body) + packer.flush())
    response.headers["Content-Encoding"] = "gzip"
    return response


def init_app(app: Flask) -> None:
    """Compress what the app answers, when the client takes gzip."""
    app.after_request(_compressed)
