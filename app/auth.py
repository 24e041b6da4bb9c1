"""Bearer tokens: to publish, and optionally to read (constant-time comparisons). Each
setting may hold several tokens, separated by commas, any of which is accepted."""

from __future__ import annotations

import base64
import binascii
import hmac

from flask import request

from .config import Config, tokens
from .errors import APIError

_CHALLENGE = 'Bearer realm="aggregator"'
# A browser cannot send a bearer token, but it asks for a password on a Basic challenge:
# any user name, the token as password.
_BASIC_CHALLENGE = 'Basic realm="aggregator", charset="UTF-8"'


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


def _matches(given: bytes, setting: str | None) -> bool:
    # compare_digest on bytes of any length: the time taken does not reveal a token. Every
    # token is compared, so neither does it tell which one matched.
    matched = False
    for token in tokens(setting):
        matched |= hmac.compare_digest(given, token.encode())
    return matched


def _refusal(given: bytes, send: str, *, basic: bool = False) -> APIError:
    """A 401 that tells a missing token from a wrong one: "send one", or, for a token that
    came and is not valid, that (and error="invalid_token" in the challenge, RFC 6750)."""
    bearer = _CHALLENGE + (', error="invalid_token"' if given else "")
    message = "The token sent is not valid here." if given else send
    return APIError(401, "unauthorized", message,
                    headers={"WWW-Authenticate": [bearer, _BASIC_CHALLENGE] if basic else bearer})


def require_write(config: Config) -> None:
    """Refuse with 401 unless the request carries the publish token (when one is set)."""
    if config.api_token is None:
        return
    given = _presented()
    if not _matches(given, config.api_token):
        raise _refusal(given, "Send Authorization: Bearer <token>.")


def require_read(config: Config) -> None:
    """Refuse with 401 unless the request carries the read token (when one is set).

    The publish token is accepted too: whoever may write may read what was written.
    """
    if config.read_token is None:
        return
    given = _presented()
    if not (_matches(given, config.read_token) or _matches(given, config.api_token)):
        raise _refusal(given, "Send Authorization: Bearer <read token> (or the token as a "
                       "Basic password).", basic=True)
