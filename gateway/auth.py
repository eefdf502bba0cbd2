"""API keys and per-key rate limits: `Authorization: Bearer <key>` on HTTP, `authorization`
metadata on gRPC.

Two sources of keys, both held as SHA-256 digests (the raw key is never kept):
- static keys (`--api-key`, repeatable): no limits, checked without any I/O;
- keys in the state store (`expertmesh keys create NAME --rpm N --tpm N --redis-url URL`), each
  with optional requests-per-minute and tokens-per-minute limits (`expertmesh.cluster.state`).

Auth is on when there is a static key or the store holds any key (revoked ones count, so
revoking the last key never opens the API); "the store holds keys" is cached for a few seconds,
so a server's first key takes up to that long to close an open API. With neither, the API is
open (one machine, as vLLM without `--api-key`). `/health` and `/metrics` are always open.

`check(token)` / `check_http(header)` raise `APIError`:
- 401 `invalid_api_key`: no key, an unknown key or a revoked key;
- 429 `rate_limit_exceeded` with `Retry-After` (whole seconds): over the key's RPM or TPM;
- 503 `state_store_unavailable`: the store (Redis) cannot be reached; requests are refused this
  way until it is back, and static keys keep working meanwhile.

TPM is counted after the fact (the check runs before the request body is read): a request is
admitted while the key's tokens of the last 60 s are under its limit, and `record_usage(n)` logs
the prompt + completion tokens a request used (the key comes from the context `check` ran in,
`current_key`). A caller that knows the tokens up front may reserve them instead:
`check(token, tokens=prompt_tokens + max_tokens)`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TypeVar

from expertmesh.cluster.state import (
    Admission,
    KeyRecord,
    StateStore,
    StateStoreUnavailable,
    hash_key,
    retry_after_header,
)
from expertmesh.gateway.protocol import APIError

__all__ = ["Authenticator", "bearer_token", "current_key", "hash_key"]

T = TypeVar("T")

current_key: ContextVar[KeyRecord | None] = ContextVar("expertmesh_current_key", default=None)
"""The store key the current request was admitted under (None: a static key or an open API)."""


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    def __init__(self, api_keys: Iterable[str] = (), store: StateStore | None = None, *,
                 keys_cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._digests = [hash_key(k) for k in api_keys]
        self.store = store
        self._keys_cache_s = keys_cache_s
        self._clock = clock
        self._store_has_keys: tuple[float, bool] | None = None  # (when asked, answer)

    @property
    def enabled(self) -> bool:
        """Whether `check` may refuse anything: static keys, or a store that may hold keys.
        (Whether the store holds any is decided in `check`, which may let the request through.)"""
        return bool(self._digests) or self.store is not None

    def valid(self, token: str | None) -> bool:
        """Whether `token` is one of the static keys."""
        if token is None:
            return False
        digest = hash_key(token)
        return any(hmac.compare_digest(digest, d) for d in self._digests)

    async def authenticate(self, token: str | None) -> KeyRecord | None:
        """The store key's record, or None for a static key or an open API; APIError 401 or 503."""
        if self.valid(token):
            return None
        if self.store is not None and token is not None:
            record = await self._call(self.store.lookup, token)
            if record is not None:
                self._store_has_keys = (self._clock(), True)
                return record
        if not await self._required():
            return None
        if token is None:
            raise _unauthorized("You didn't provide an API key: pass it as 'Authorization: Bearer <key>'.")
        raise _unauthorized("Incorrect API key provided.")

    async def check(self, token: str | None, tokens: int = 0) -> KeyRecord | None:
        """Authenticate, then admit one request of `tokens` tokens under the key's limits.
        Sets `current_key` for `record_usage`. Raises APIError 401, 429 or 503."""
        record = await self.authenticate(token)
        current_key.set(record)
        if record is not None and record.limited:
            admission: Admission = await self._call(self.store.admit, record.id, record.requests_per_minute,
                                                    record.tokens_per_minute, tokens)
            if not admission.ok:
                raise _rate_limited(record, admission, tokens)
        return record

    async def check_http(self, header: str | None, tokens: int = 0) -> KeyRecord | None:
        return await self.check(bearer_token(header), tokens)

    async def record_usage(self, tokens: int, key: KeyRecord | None = None) -> None:
        """Log `tokens` (prompt + completion) against the request's key, for its TPM limit. A
        store that is down loses this record (the response is already out) rather than failing."""
        key = key or current_key.get()
        if key is None or key.tokens_per_minute is None or tokens <= 0 or self.store is None:
            return
        with contextlib.suppress(APIError):
            await self._call(self.store.record_tokens, key.id, tokens)

    async def _required(self) -> bool:
        if self._digests:
            return True
        if self.store is None:
            return False
        cached = self._store_has_keys
        if cached is not None and self._clock() - cached[0] < self._keys_cache_s:
            return cached[1]
        has = await self._call(self.store.has_keys)
        self._store_has_keys = (self._clock(), has)
        return has

    async def _call(self, fn: Callable[..., T], *args) -> T:
        try:
            if self.store is not None and self.store.blocking:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)
        except StateStoreUnavailable as exc:
            raise APIError(f"{exc}; requests that need an API key are refused until it is back.", status=503,
                           type="server_error", code="state_store_unavailable") from exc


def _unauthorized(message: str) -> APIError:
    return APIError(message, status=401, type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def _rate_limited(record: KeyRecord, admission: Admission, tokens: int) -> APIError:
    if admission.retry_after_s is None:  # too large to ever fit
        return APIError(f"Request too large for API key '{record.name}': it needs {tokens} tokens, more than its "
                        f"limit of {record.tokens_per_minute} tokens per minute.", status=429, type="tokens",
                        code="rate_limit_exceeded")
    reasons = (admission.reason or "requests").split(",")
    limits = []
    if "requests" in reasons:
        limits.append(f"{record.requests_per_minute} requests per minute")
    if "tokens" in reasons:
        limits.append(f"{record.tokens_per_minute} tokens per minute")
    return APIError(f"Rate limit reached for API key '{record.name}': {' and '.join(limits)}. "
                    f"Try again in {admission.retry_after_s:.1f}s.", status=429, type=reasons[0],
                    code="rate_limit_exceeded", headers={"Retry-After": retry_after_header(admission.retry_after_s)})
