"""API keys and per-key rate limits: `Authorization: Bearer <key>` on HTTP, `authorization`
metadata on gRPC.

Two sources of keys, both held as SHA-256 digests (the raw key is never kept):
- static keys (`--api-key`, repeatable, or `api_keys_env`): no limits, checked without any I/O;
- keys in the state store (`expertmesh keys create NAME --rpm N --tpm N --redis-url URL`), each
  with optional requests-per-minute and tokens-per-minute limits (`expertmesh.cluster.state`).

Whether a key is required follows from the configuration alone: it is when there is a static key
or a key store (`--redis-url`), never from what the store holds. A configured store that holds no
key (Redis restarted empty, or flushed) admits nobody: every request gets 401, the log says why
and `/health` reports it (`status()`). With neither source the API is open (one machine, as vLLM
without `--api-key`). `/health` and `/metrics` are always open.

`check(token)` / `check_http(header)` raise `APIError`:
- 401 `invalid_api_key`: no key, an unknown key or a revoked key;
- 429 `rate_limit_exceeded` with `Retry-After` (whole seconds): over the key's RPM, or its TPM is
  used up (logged and reserved tokens of the last 60 s);
- 503 `state_store_unavailable`: the store (Redis) cannot be reached; requests with a store key
  are refused this way until it is back, and static keys keep working meanwhile. The response
  never names the store's address (the log does, without its password).

Tokens per minute are reserved, then settled. `check` runs before the request body is read, so it
admits by RPM (and refuses a key whose TPM is already used up). Once the serving layer knows the
request's most tokens (prompt + max_tokens x n) it calls `reserve(tokens)` (429 when they do not
fit), and `settle(reservation, used)` when the request ends however it ends (finished, failed,
cancelled): the difference is refunded. So concurrent requests never hold more than the limit.
The key comes from the context `check` ran in (`current_key`).

What a caller owns (its stored responses) is scoped by `current_identity`, which `check` sets too:
"key:<id>" for a store key, "static:<SHA-256 digest>" for a static key, None on an open API.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import TypeVar

from expertmesh.cluster.state import (
    Admission,
    KeyRecord,
    Reservation,
    StateStore,
    StateStoreUnavailable,
    hash_key,
    retry_after_header,
)
from expertmesh.gateway.protocol import APIError

__all__ = ["Authenticator", "bearer_token", "current_identity", "current_key", "hash_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")

current_key: ContextVar[KeyRecord | None] = ContextVar("expertmesh_current_key", default=None)
"""The store key the current request was admitted under (None: a static key or an open API)."""

current_identity: ContextVar[str | None] = ContextVar("expertmesh_current_identity", default=None)
"""Who the current request was admitted as, for what it owns (stored responses): "key:<id>" (a store
key), "static:<digest>" (a static key: its SHA-256 digest, never the key), None (an open API)."""

NO_STORE_KEYS = "no keys configured in the store: every request is refused"
"""`status()` of a key store with no valid key and no static key (also logged as a warning)."""


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class Authenticator:
    """`api_keys`: static keys. `store`: the key store (a configured key source: handing one in
    makes a key required, whatever it holds). `keys_cache_s`: how long `status()` trusts its last
    count of the store's keys."""

    def __init__(self, api_keys: Iterable[str] = (), store: StateStore | None = None, *,
                 keys_cache_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._digests = [hash_key(k) for k in api_keys]
        self.store = store
        self._keys_cache_s = keys_cache_s
        self._clock = clock
        self._store_keys: tuple[float, int | None] | None = None  # (when counted, valid keys; None: unreachable)
        self._counting: asyncio.Future | None = None
        self._outage_logged = float("-inf")

    @property
    def enabled(self) -> bool:
        """Whether a key is required: static keys or a key store are configured."""
        return bool(self._digests) or self.store is not None

    def valid(self, token: str | None) -> bool:
        """Whether `token` is one of the static keys."""
        if token is None:
            return False
        digest = hash_key(token)
        return any(hmac.compare_digest(digest, d) for d in self._digests)

    async def authenticate(self, token: str | None) -> KeyRecord | None:
        """The store key's record, or None for a static key or an open API; APIError 401 or 503."""
        if not self.enabled or self.valid(token):
            return None
        if self.store is not None and token is not None:
            record = await self._call(self.store.lookup, token)
            if record is not None:
                return record
        if self.store is not None and not self._digests:
            self._count_store_keys_soon()  # an empty store gets its warning logged
        if token is None:
            raise _unauthorized("You didn't provide an API key: pass it as 'Authorization: Bearer <key>'.")
        raise _unauthorized("Incorrect API key provided.")

    async def check(self, token: str | None) -> KeyRecord | None:
        """Authenticate, then admit one request under the key's limits (RPM; a used-up TPM).
        Sets `current_key` for `reserve`. Raises APIError 401, 429 or 503."""
        record = await self.authenticate(token)
        current_key.set(record)
        current_identity.set(identity_of(record, token) if self.enabled else None)
        if record is not None and record.limited:
            admission: Admission = await self._call(self.store.admit, record.id, record.requests_per_minute,
                                                    record.tokens_per_minute, 0)
            if not admission.ok:
                raise _rate_limited(record, admission, 0)
        return record

    async def check_http(self, header: str | None) -> KeyRecord | None:
        return await self.check(bearer_token(header))

    async def reserve(self, tokens: int, key: KeyRecord | None = None) -> Reservation | None:
        """Hold `tokens` (the request's most: prompt + max_tokens x n) of the request's key's TPM
        budget; None when the key has no TPM limit. APIError 429 (with Retry-After unless the
        request can never fit) or 503."""
        key = key or current_key.get()
        if key is None or key.tokens_per_minute is None or self.store is None:
            return None
        admission: Admission = await self._call(self.store.reserve_tokens, key.id, key.tokens_per_minute, tokens)
        if not admission.ok:
            raise _rate_limited(key, admission, tokens)
        return admission.reservation

    async def settle(self, reservation: Reservation | None, used: int) -> None:
        """Release `reservation`, logging the `used` tokens (prompt + generated). A store that is
        down keeps the reservation until it expires (RESERVATION_TTL_S) rather than failing a
        request whose response is already out."""
        if reservation is None or self.store is None:
            return
        try:
            await self._call(self.store.settle_tokens, reservation, max(0, int(used)))
        except APIError:
            log.warning("could not settle a token reservation of key %s (the state store is unreachable); it "
                        "holds %d tokens until it expires", reservation.key_id, reservation.tokens)

    async def status(self, wait_s: float = 0.5) -> str:
        """What auth does, in a phrase for `/health` (never a key, nor the store's address).
        Counting the store's keys is cached for `keys_cache_s` and waited for at most `wait_s`."""
        if self.store is None:
            return "on: static API keys" if self._digests else "off: no API key is configured, the API is open"
        pending = self._count_store_keys_soon()
        if pending is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(pending), wait_s)
        counted = self._store_keys
        if counted is None:
            return "on: counting the keys in the store"
        count = counted[1]
        if count is None:
            return "on: the key store is unreachable, requests with a store key are refused"
        if count == 0 and not self._digests:
            return NO_STORE_KEYS
        static = " and static keys" if self._digests else ""
        return f"on: {count} key{'s' if count != 1 else ''} in the store{static}"

    def _count_store_keys_soon(self) -> asyncio.Future | None:
        """Recount the store's valid keys in the background unless counted within `keys_cache_s`;
        the count pending, or None when the cached one is fresh."""
        pending = self._counting
        if pending is not None and not pending.done() and pending.get_loop() is asyncio.get_running_loop():
            return pending
        counted = self._store_keys
        if counted is not None and self._clock() - counted[0] < self._keys_cache_s:
            return None
        self._counting = asyncio.ensure_future(self._count_store_keys())
        return self._counting

    async def _count_store_keys(self) -> None:
        assert self.store is not None
        try:
            count: int | None = await self._call(self.store.active_key_count)
        except Exception:  # an unreachable store (logged by _call), or a reply we cannot read
            log.debug("API keys: could not count the store's keys", exc_info=True)
            count = None
        previous = self._store_keys[1] if self._store_keys is not None else -1
        self._store_keys = (self._clock(), count)
        if count == 0 and previous != 0 and not self._digests:
            log.warning("API keys: the key store (%s) holds no valid key, so every request is refused with 401. "
                        "Create one with `expertmesh keys create NAME --redis-url URL`.", self.store.description)
        elif count and previous == 0:
            log.info("API keys: the key store holds %d valid key(s) again", count)

    async def _call(self, fn: Callable[..., T], *args) -> T:
        try:
            if self.store is not None and self.store.blocking:
                return await asyncio.to_thread(fn, *args)
            return fn(*args)
        except StateStoreUnavailable as exc:
            now = self._clock()
            if now - self._outage_logged >= 10.0:  # once per 10 s, not per request
                self._outage_logged = now
                log.warning("API keys: %s", exc)  # the address, without its password, goes to the log only
            raise APIError("The state store is unreachable; requests that need an API key from it are refused "
                           "until it is back.", status=503, type="server_error",
                           code="state_store_unavailable") from None


def identity_of(record: KeyRecord | None, token: str | None) -> str | None:
    """`current_identity` of an admitted caller: its store key's id, else its static key's digest."""
    if record is not None:
        return f"key:{record.id}"
    return None if token is None else f"static:{hash_key(token)}"


def _unauthorized(message: str) -> APIError:
    return APIError(message, status=401, type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def _rate_limited(record: KeyRecord, admission: Admission, tokens: int) -> APIError:
    if admission.retry_after_s is None:  # too large to ever fit
        return APIError(f"Request too large for API key '{record.name}': it may use {tokens} tokens (the prompt "
                        f"and max_tokens), more than its limit of {record.tokens_per_minute} tokens per minute. "
                        "Lower max_tokens.", status=429, type="tokens", code="rate_limit_exceeded")
    reasons = (admission.reason or "requests").split(",")
    limits = []
    if "requests" in reasons:
        limits.append(f"{record.requests_per_minute} requests per minute")
    if "tokens" in reasons:
        limits.append(f"{record.tokens_per_minute} tokens per minute"
                      + (f" (this request may use {tokens})" if tokens else ""))
    return APIError(f"Rate limit reached for API key '{record.name}': {' and '.join(limits)}. "
                    f"Try again in {admission.retry_after_s:.1f}s.", status=429, type=reasons[0],
                    code="rate_limit_exceeded", headers={"Retry-After": retry_after_header(admission.retry_after_s)})
