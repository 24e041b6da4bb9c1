"""Bearer tokens: one to publish, an optional one to read (constant-time comparisons)."""

from __future__ import annotations

import base64
import binascii
import hmac

from flask import request

from .config import Config
from .errors import APIError

_CHALLENGE = 'Bearer realm="aggregator"'
# A browser cannot send a bearer token, but it asks for a password on a Basic challenge:
# any user name, the token as password.
_READ_CHALLENGES = [_CHALLENGE, 'Basic realm="aggregator", charset="UTF-8"']


def _presented() -> bytes:
    """Return the token the request carries (Bearer, or a Basic password), or b''."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip().encode()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""


def _matches(given: bytes, token: str | None) -> bool:
    # compare_digest on bytes of any length: the time taken does not reveal the token.
    return token is not None and hmac.compare_digest(given, token.encode())


def require_write(config: Config) -> None:
    """Refuse with 401 unless the request carries the publish token (when one is set)."""
    if config.api_token is None:
        return
    if not _matches(_presented(), config.api_token):
        raise APIError(401, "unauthorized", "Send Authorization: Bearer <token>.",
                       headers={"WWW-Authenticate": _CHALLENGE})


def require_read(config: Config) -> None:
    """Refuse with 401 unless the request carries the read token (when one is set).

    The publish token is accepted too: whoever may write may read what was written.
    """
    if config.read_token is None:
        return
    given = _presented()
    if not (_matches(given, config.read_token) or _matches(given, config.api_token)):
        raise APIError(401, "unauthorized",
                       "Send Authorization: Bearer <read token> (or the token as a Basic "
                       "password).", headers={"WWW-Authenticate": _READ_CHALLENGES})
