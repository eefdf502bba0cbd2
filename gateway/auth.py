"""API keys: `Authorization: Bearer <key>` on HTTP, `authorization` metadata on gRPC.

Keys are held as SHA-256 digests and compared in constant time; the raw key is never kept.
With no key configured the API is open (one machine, as vLLM without `--api-key`). The
`/health` and `/metrics` routes are always open.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from expertmesh.gateway.protocol import APIError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    def __init__(self, api_keys: Iterable[str] = ()) -> None:
        self._digests = [hash_key(k) for k in api_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def valid(self, token: str | None) -> bool:
        if token is None:
            return False
        digest = hash_key(token)
        return any(hmac.compare_digest(digest, d) for d in self._digests)

    async def check(self, token: str | None) -> None:
        """Raise a 401 APIError unless the token is a valid key (or no keys are configured)."""
        if not self.enabled:
            return
        if token is None:
            raise _unauthorized("You didn't provide an API key: pass it as 'Authorization: Bearer <key>'.")
        if not self.valid(token):
            raise _unauthorized("Incorrect API key provided.")

    async def check_http(self, header: str | None) -> None:
        await self.check(bearer_token(header))


def _unauthorized(message: str) -> APIError:
    return APIError(message, status=401, type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})
