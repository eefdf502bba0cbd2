"""The shared state store: API keys, per-key rate limits, the model/replica registry and the
Responses API's stored responses.

One interface (`StateStore`), two backends:

- `InProcessStateStore` (the default): dicts behind a lock. It lives inside one process, so it
  suits one machine with one gateway; nothing outside that process can reach it.
- `RedisStateStore(url)`: every gateway replica (and `expertmesh keys ...`) shares one Redis.
  Rate limits are decided by Lua scripts, so admission is atomic across replicas and processes,
  and every time stamp is Redis's own clock (`TIME`), so the gateways' clocks never matter.

`make_state_store(redis_url)` picks one.

API keys. `create_key(name, ...)` returns the raw key (`em-` and 32 URL-safe characters) once;
the store keeps only its SHA-256 digest (`hash_key`), the key's id (`key_...`), its name, its
creation time, its limits and, once revoked, the revocation time. `lookup(raw_key)` hashes and
finds the record; a revoked key is not valid. Revoked keys stay listed. Whether the API needs a key
never depends on what the store holds (`expertmesh.gateway.auth`): an empty store admits nobody.

Rate limits: a sliding-window log over the last 60 s (`WINDOW_S`), per key, plus the key's
token reservations that are still open.
`admit(key_id, requests_per_minute, tokens_per_minute, tokens)` admits a request when

- fewer than `requests_per_minute` requests were admitted in the last 60 s, and
- the tokens logged in the last 60 s, plus the open reservations, plus `max(tokens, 1)` fit in
  `tokens_per_minute`;

an admitted request logs one request and its `tokens`. So no 60-second window ever holds more
admitted requests than the limit, whatever the number of callers. A refusal says when to retry
(`retry_after_s`: when enough of the log will have aged out, at most `WINDOW_S`). A request whose
`tokens` alone exceed the limit can never fit: it is refused with `retry_after_s=None` (reason
"too_large").

Tokens per minute, reserved and settled (what the gateway does):

    reserve_tokens(key_id, tpm, prompt + max_tokens * n)  -> Admission(ok, reservation=...)
        ... the request runs ...
    settle_tokens(reservation, used)     # prompt + generated tokens; the rest is refunded

A reservation holds its tokens until it is settled (then `used` enters the log at that moment and
ages out 60 s later) or until `RESERVATION_TTL_S` passes (a gateway that died mid-request must not
hold a key's budget forever). Reserving is atomic (a lock here, a Lua script in Redis), so N
concurrent requests never reserve more than the limit between them, and settling is idempotent.
`record_tokens(key_id, n)` logs usage without a reservation.

Registry: `register_replica(model, replica_id, info, ttl_s)` (re-register before `ttl_s` to stay
listed), `list_replicas(model) -> {replica_id: info}`, `unregister_replica(model, replica_id)`.

Stored responses (`/v1/responses` with `store`): `put_response(id, record, ttl_s)` keeps a
JSON-serialisable record (the response, the conversation's input items, its owner) for `ttl_s`
seconds; `get_response(id)` returns a copy or None once it expired or was deleted;
`delete_response(id)` says whether it was there. A record's JSON is at most
`MAX_RESPONSE_RECORD_BYTES` (`ResponseTooLarge` beyond). Redis keeps each as one string with an
expiry (SET EX, whole seconds); the in-process store keeps at most `max_responses` records and
`max_response_bytes` characters of JSON, evicting the oldest first.

Redis outages: every connection error, timeout or "loading" reply becomes
`StateStoreUnavailable`, whose message names the (password-redacted) URL. Sockets time out
quickly and a failed command is retried twice with a short backoff; the connection pool
reconnects by itself, so once Redis is back the same store object works again (Lua scripts are
reloaded if the restarted server lost them). Nothing is cached on the client side, so nothing
is lost that Redis persisted.
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

WINDOW_S = 60.0
"""Length of the rate-limit window: limits are per 60 seconds, sliding."""
RESERVATION_TTL_S = 600.0
"""How long an unsettled token reservation holds a key's budget (a request that outlives it, or
whose gateway died, stops counting then)."""

MAX_RESPONSE_RECORD_BYTES = 16 << 20
"""Largest stored response record (its JSON): a whole conversation of a 262,144-token context with
its tool outputs fits several times over."""

KEY_PREFIX = "em-"
KEY_ID_PREFIX = "key_"
_NAME_MAX = 100


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a raw API key is stored and compared."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)  # 24 random bytes: 32 URL-safe characters


class StateStoreUnavailable(RuntimeError):
    """The state store cannot be reached (Redis down, timing out or still loading)."""


class ResponseTooLarge(ValueError):
    """A response record whose JSON exceeds MAX_RESPONSE_RECORD_BYTES."""


def response_json(record: dict[str, Any]) -> str:
    """A response record as the stores keep it (compact JSON), or ResponseTooLarge."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_RESPONSE_RECORD_BYTES // 4 and len(text.encode("utf-8")) > MAX_RESPONSE_RECORD_BYTES:
        raise ResponseTooLarge(f"the response record is {len(text.encode('utf-8'))} bytes, over the limit of "
                               f"{MAX_RESPONSE_RECORD_BYTES}")
    return text


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: never the raw key, nor its digest."""
    id: str
    name: str
    created_at: float
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "revoked": self.revoked}


@dataclass(frozen=True)
class Admission:
    ok: bool
    retry_after_s: float | None = None
    """Seconds until the request would be admitted; None when admitted, or when it never can be."""
    reason: str | None = None
    """Why not: "requests" (RPM), "tokens" (TPM), "requests,tokens", or "too_large"."""
    reservation: Reservation | None = None
    """What `reserve_tokens` holds for the request; settle it with `settle_tokens`."""


@dataclass(frozen=True)
class Reservation:
    """Tokens held for one request under a key's tokens-per-minute limit."""
    key_id: str
    id: str
    tokens: int


class StateStore(ABC):
    """API keys, rate limits and the replica registry. Methods block (Redis round trips): call
    them through `asyncio.to_thread` from an event loop unless `blocking` is False."""

    blocking: bool = True
    description: str = ""
    """Where the state lives, for messages ("in-process", or the URL without its password)."""

    # ---- API keys
    @abstractmethod
    def create_key(self, name: str, requests_per_minute: int | None = None,
                   tokens_per_minute: int | None = None) -> tuple[str, KeyRecord]:
        """A new key named `name` (unique among active keys): (raw key, shown once; its record)."""

    @abstractmethod
    def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first."""

    @abstractmethod
    def revoke_key(self, name_or_id: str) -> KeyRecord:
        """Revoke the key with this id, or the active key with this name; KeyError if none.
        Revoking a revoked key (by id) returns its record unchanged."""

    @abstractmethod
    def lookup(self, raw_key: str) -> KeyRecord | None:
        """The active key's record, or None (unknown or revoked)."""

    @abstractmethod
    def has_keys(self) -> bool:
        """Whether any key was ever created (revoked ones count)."""

    def active_key_count(self) -> int:
        """How many keys are valid now (for `/health` and the log; a list, so not per request)."""
        return sum(not r.revoked for r in self.list_keys())

    # ---- rate limits
    @abstractmethod
    def admit(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None,
              tokens: int = 0) -> Admission:
        """Atomically decide and log one request (see the module docstring). None: no limit."""

    @abstractmethod
    def record_tokens(self, key_id: str, n: int) -> None:
        """Log `n` tokens used now by `key_id` (TPM counted after the fact)."""

    @abstractmethod
    def reserve_tokens(self, key_id: str, tokens_per_minute: int | None, tokens: int) -> Admission:
        """Atomically hold `tokens` of the key's budget if they fit (see the module docstring); the
        admission carries the reservation (None when the key has no limit)."""

    @abstractmethod
    def settle_tokens(self, reservation: Reservation, used: int) -> None:
        """Release the reservation and log the `used` tokens now. Settling twice changes nothing;
        a reservation that expired first logs nothing (it held its tokens for RESERVATION_TTL_S)."""

    # ---- model/replica registry
    @abstractmethod
    def register_replica(self, model: str, replica_id: str, info: dict[str, Any], ttl_s: float) -> None:
        """List `replica_id` under `model` for `ttl_s` seconds (again to extend)."""

    @abstractmethod
    def list_replicas(self, model: str) -> dict[str, dict[str, Any]]:
        """replica_id -> info of the live replicas of `model`."""

    @abstractmethod
    def unregister_replica(self, model: str, replica_id: str) -> None: ...

    # ---- stored responses (the Responses API)
    @abstractmethod
    def put_response(self, response_id: str, record: dict[str, Any], ttl_s: float) -> None:
        """Keep `record` (JSON-serialisable) under `response_id` for `ttl_s` seconds (replacing any);
        ResponseTooLarge when its JSON exceeds MAX_RESPONSE_RECORD_BYTES."""

    @abstractmethod
    def get_response(self, response_id: str) -> dict[str, Any] | None:
        """A copy of the stored record, or None (never stored, expired, deleted or evicted)."""

    @abstractmethod
    def delete_response(self, response_id: str) -> bool:
        """Forget the record; whether there was one."""

    # ---- lifecycle
    def ping(self) -> None:  # noqa: B027 (answers by default: the in-process store is always there)
        """Raise StateStoreUnavailable unless the store answers."""

    def close(self) -> None:  # noqa: B027 (nothing to release by default)
        """Release connections."""


def make_state_store(redis_url: str | None) -> StateStore:
    """Redis at `redis_url`, or the in-process store when it is None or empty."""
    return RedisStateStore(redis_url) if redis_url else InProcessStateStore()


# ---- validation shared by both backends ------------------------------------------------------

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a key name must be a non-empty string")
    if len(name) > _NAME_MAX or not name.isprintable():
        raise ValueError(f"a key name is at most {_NAME_MAX} printable characters (got {name!r})")
    if name.startswith(KEY_ID_PREFIX):
        raise ValueError(f"a key name may not start with {KEY_ID_PREFIX!r} (that is how key ids start)")
    return name


def _check_limit(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer or None (got {value!r})")
    return value


def _check_tokens(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"tokens must be a non-negative integer (got {n!r})")
    return n


# ---- in-process ----------------------------------------------------------------------------

class _Window:
    """One key's log: admitted request times and (time, tokens) entries, oldest first, and its
    open reservations (id -> (expires, tokens))."""

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0
        self.reserved: dict[str, tuple[float, int]] = {}
        self.reserved_sum = 0

    def trim(self, now: float) -> None:
        cutoff = now - WINDOW_S
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.token_sum -= self.tokens.popleft()[1]
        for rid in [rid for rid, (expires, _) in self.reserved.items() if expires <= now]:
            self.reserved_sum -= self.reserved.pop(rid)[1]

    def tokens_retry(self, need: int, now: float) -> float | None:
        """Seconds until `need` tokens are freed (log entries age out, reservations expire at the
        latest), at most WINDOW_S; None when nothing is missing."""
        if need <= 0:
            return None
        frees = sorted([(ts + WINDOW_S, n) for ts, n in self.tokens] + list(self.reserved.values()))
        freed = 0
        for at, n in frees:
            freed += n
            if freed >= need:
                return min(max(at - now, 1e-3), WINDOW_S)
        return WINDOW_S


class InProcessStateStore(StateStore):
    """The state of one process (thread-safe). Keys created here live as long as the process."""

    blocking = False
    description = "in-process"

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, max_responses: int = 10_000,
                 max_response_bytes: int = 256 << 20) -> None:
        """`max_responses`, `max_response_bytes`: what the stored responses may hold (records, and
        characters of their JSON) before the oldest are evicted."""
        self._lock = threading.Lock()
        self._clock = clock
        self._by_digest: dict[str, KeyRecord] = {}
        self._digest_of: dict[str, str] = {}  # id -> digest
        self._windows: dict[str, _Window] = {}
        self._replicas: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        self._responses: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (expires, JSON), oldest first
        self._response_bytes = 0
        self.max_responses, self.max_response_bytes = max_responses, max_response_bytes

    def create_key(self, name, requests_per_minute=None, tokens_per_minute=None):
        name = _check_name(name)
        rpm = _check_limit(requests_per_minute, "requests_per_minute")
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        raw = new_raw_key()
        record = KeyRecord(KEY_ID_PREFIX + secrets.token_hex(8), name, time.time(), rpm, tpm)
        with self._lock:
            if any(r.name == name and not r.revoked for r in self._by_digest.values()):
                raise ValueError(f"an active key named {name!r} exists already")
            digest = hash_key(raw)
            self._by_digest[digest] = record
            self._digest_of[record.id] = digest
        return raw, record

    def list_keys(self):
        with self._lock:
            return sorted(self._by_digest.values(), key=lambda r: (r.created_at, r.id))

    def revoke_key(self, name_or_id):
        with self._lock:
            digest = self._digest_of.get(name_or_id)
            if digest is None:
                digest = next((d for d, r in self._by_digest.items() if r.name == name_or_id and not r.revoked), None)
            if digest is None:
                raise KeyError(f"no key with id {name_or_id!r} and no active key named {name_or_id!r}")
            record = self._by_digest[digest]
            if not record.revoked:
                record = self._by_digest[digest] = KeyRecord(**{**asdict(record), "revoked_at": time.time()})
            return record

    def lookup(self, raw_key):
        with self._lock:
            record = self._by_digest.get(hash_key(raw_key))
        return None if record is None or record.revoked else record

    def has_keys(self):
        with self._lock:
            return bool(self._by_digest)

    def admit(self, key_id, requests_per_minute, tokens_per_minute, tokens=0):
        rpm = _check_limit(requests_per_minute, "requests_per_minute")
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        tokens = _check_tokens(tokens)
        if tpm is not None and tokens > tpm:
            return Admission(False, None, "too_large")
        if rpm is None and tpm is None:
            return Admission(True)
        with self._lock:
            now = self._clock()
            w = self._windows.setdefault(key_id, _Window())
            w.trim(now)
            retry, reasons = 0.0, []
            if rpm is not None and len(w.requests) >= rpm:
                reasons.append("requests")
                retry = max(retry, w.requests[len(w.requests) - rpm] + WINDOW_S - now)
            if tpm is not None:
                wait = w.tokens_retry(w.token_sum + w.reserved_sum + max(tokens, 1) - tpm, now)
                if wait is not None:
                    reasons.append("tokens")
                    retry = max(retry, wait)
            if reasons:
                return Admission(False, max(retry, 1e-3), ",".join(reasons))
            if rpm is not None:
                w.requests.append(now)
            if tpm is not None and tokens:
                w.tokens.append((now, tokens))
                w.token_sum += tokens
            return Admission(True)

    def record_tokens(self, key_id, n):
        if _check_tokens(n) == 0:
            return
        with self._lock:
            now = self._clock()
            w = self._windows.setdefault(key_id, _Window())
            w.trim(now)
            w.tokens.append((now, n))
            w.token_sum += n

    def reserve_tokens(self, key_id, tokens_per_minute, tokens):
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        tokens = _check_tokens(tokens)
        if tpm is None:
            return Admission(True)
        if tokens > tpm:
            return Admission(False, None, "too_large")
        with self._lock:
            now = self._clock()
            w = self._windows.setdefault(key_id, _Window())
            w.trim(now)
            wait = w.tokens_retry(w.token_sum + w.reserved_sum + max(tokens, 1) - tpm, now)
            if wait is not None:
                return Admission(False, wait, "tokens")
            reservation = Reservation(key_id, uuid.uuid4().hex, tokens)
            w.reserved[reservation.id] = (now + RESERVATION_TTL_S, tokens)
            w.reserved_sum += tokens
            return Admission(True, reservation=reservation)

    def settle_tokens(self, reservation, used):
        used = _check_tokens(used)
        with self._lock:
            now = self._clock()
            w = self._windows.setdefault(reservation.key_id, _Window())
            w.trim(now)
            held = w.reserved.pop(reservation.id, None)
            if held is None:
                return  # settled already, or expired
            w.reserved_sum -= held[1]
            if used:
                w.tokens.append((now, used))
                w.token_sum += used

    def register_replica(self, model, replica_id, info, ttl_s):
        info = json.loads(json.dumps(info))  # what Redis would keep: JSON, a copy
        with self._lock:
            self._replicas.setdefault(model, {})[replica_id] = (self._clock() + ttl_s, info)

    def list_replicas(self, model):
        with self._lock:
            now = self._clock()
            entries = self._replicas.get(model, {})
            for rid in [rid for rid, (expires, _) in entries.items() if expires <= now]:
                del entries[rid]
            return {rid: json.loads(json.dumps(info)) for rid, (_, info) in sorted(entries.items())}

    def unregister_replica(self, model, replica_id):
        with self._lock:
            self._replicas.get(model, {}).pop(replica_id, None)

    def put_response(self, response_id, record, ttl_s):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive (got {ttl_s!r})")
        text = response_json(record)
        with self._lock:
            self._drop_response(response_id)
            self._responses[response_id] = (self._clock() + ttl_s, text)
            self._response_bytes += len(text)
            now = self._clock()
            while self._responses and (len(self._responses) > self.max_responses
                                       or self._response_bytes > self.max_response_bytes
                                       or next(iter(self._responses.values()))[0] <= now):
                self._drop_response(next(iter(self._responses)))

    def get_response(self, response_id):
        with self._lock:
            entry = self._responses.get(response_id)
            if entry is not None and entry[0] <= self._clock():
                self._drop_response(response_id)
                entry = None
        return None if entry is None else json.loads(entry[1])

    def delete_response(self, response_id):
        with self._lock:
            entry = self._responses.get(response_id)
            self._drop_response(response_id)
            return entry is not None and entry[0] > self._clock()

    def _drop_response(self, response_id: str) -> None:
        entry = self._responses.pop(response_id, None)
        if entry is not None:
            self._response_bytes -= len(entry[1])


def retry_after_header(seconds: float) -> str:
    """Retry-After's value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


# The Redis backend builds on the definitions above; re-exported so callers need one import.
from expertmesh.cluster.redis_state import RedisStateStore, redact_url  # noqa: E402, F401
