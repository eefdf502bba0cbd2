"""The Redis backend of the state store (`expertmesh.cluster.state`): every gateway replica and
`expertmesh keys ...` share one Redis. Rate limits are decided by Lua scripts, so admission is
atomic across replicas and processes, and every time stamp is Redis's own clock (`TIME`).
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from expertmesh.cluster.state import (
    KEY_ID_PREFIX,
    RESERVATION_TTL_S,
    WINDOW_S,
    Admission,
    KeyRecord,
    Reservation,
    StateStore,
    StateStoreUnavailable,
    _check_limit,
    _check_name,
    _check_tokens,
    hash_key,
    new_raw_key,
    response_json,
)

log = logging.getLogger(__name__)

# A Lua function the rate-limit scripts share: trims a key's token log (KEYS tok, scores: times)
# and its reservations (KEYS res, scores: expiry times; members "<id>:<tokens>" in both) and
# returns nil when `tokens` more fit in `tpm`, else the seconds until enough is freed (<= window).
_TOKENS_WAIT = """
local function tokens_wait(tok, res, now, window, tokens, tpm)
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', res, '-inf', now)
  local frees, used = {}, 0
  local e = redis.call('ZRANGE', tok, 0, -1, 'WITHSCORES')
  for i = 1, #e, 2 do
    local n = tonumber(string.match(e[i], ':(%d+)$'))
    used = used + n
    table.insert(frees, {tonumber(e[i + 1]) + window, n})
  end
  e = redis.call('ZRANGE', res, 0, -1, 'WITHSCORES')
  for i = 1, #e, 2 do
    local n = tonumber(string.match(e[i], ':(%d+)$'))
    used = used + n
    table.insert(frees, {tonumber(e[i + 1]), n})
  end
  local need = used + math.max(tokens, 1) - tpm
  if need <= 0 then return nil end
  table.sort(frees, function(a, b) return a[1] < b[1] end)
  local freed = 0
  for _, f in ipairs(frees) do
    freed = freed + f[2]
    if freed >= need then return math.min(math.max(f[1] - now, 0.001), window) end
  end
  return window
end
"""

# KEYS: requests zset, tokens zset, reservations zset. ARGV: rpm (-1: none), tpm (-1: none), tokens,
# unique id, window s. Returns {1} or {0, retry_after (string; "-1": never), reason}.
_ADMIT = _TOKENS_WAIT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[5])
if tpm >= 0 and tokens > tpm then return {0, '-1', 'too_large'} end
local retry, reasons = 0, {}
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    table.insert(reasons, 'requests')
    local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    retry = math.max(retry, tonumber(e[2]) + window - now)
  end
end
if tpm >= 0 then
  local wait = tokens_wait(KEYS[2], KEYS[3], now, window, tokens, tpm)
  if wait then
    table.insert(reasons, 'tokens')
    retry = math.max(retry, wait)
  end
end
if #reasons > 0 then return {0, tostring(math.max(retry, 0.001)), table.concat(reasons, ',')} end
local ttl = math.ceil(window * 1000) + 1000
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if tpm >= 0 and tokens > 0 then
  redis.call('ZADD', KEYS[2], now, ARGV[4] .. ':' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1}
"""

# KEYS: tokens zset, reservations zset. ARGV: tpm, tokens, reservation id, window s, ttl s.
# Returns {1} or {0, retry_after (string; "-1": never), reason}.
_RESERVE = _TOKENS_WAIT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if tokens > tpm then return {0, '-1', 'too_large'} end
local wait = tokens_wait(KEYS[1], KEYS[2], now, window, tokens, tpm)
if wait then return {0, tostring(wait), 'tokens'} end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3] .. ':' .. ARGV[2])
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 1000) + 1000)
return {1}
"""

# KEYS: tokens zset, reservations zset. ARGV: reservation id, reserved tokens, used tokens, window s.
# Logs the usage only if the reservation was still held, so running it twice changes nothing.
_SETTLE = """
if redis.call('ZREM', KEYS[2], ARGV[1] .. ':' .. ARGV[2]) == 0 then return 0 end
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000) + 1000)
end
return 1
"""

# KEYS: tokens zset. ARGV: tokens, unique id, window s.
_RECORD_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
return 1
"""

# KEYS: record hash, id -> digest, name -> id, set of ids. ARGV: digest, id, name, created_at, rpm, tpm.
_CREATE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'name', ARGV[3], 'created_at', ARGV[4], 'rpm', ARGV[5], 'tpm', ARGV[6])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"""

# ARGV: prefix, name or id. Returns the digest of the revoked key, or false.
_REVOKE = """
local p, x = ARGV[1], ARGV[2]
local id = x
local digest = redis.call('GET', p .. 'keyid:' .. id)
if not digest then
  id = redis.call('GET', p .. 'keyname:' .. x)
  if not id then return false end
  digest = redis.call('GET', p .. 'keyid:' .. id)
  if not digest then return false end
end
local rec = p .. 'key:' .. digest
if redis.call('HEXISTS', rec, 'revoked_at') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', rec, 'revoked_at', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
  local name = redis.call('HGET', rec, 'name')
  local nk = p .. 'keyname:' .. name
  if redis.call('GET', nk) == id then redis.call('DEL', nk) end
end
return digest
"""

# KEYS: the model's hash. ARGV: replica id, info JSON, ttl s.
_REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({expires = now + ttl, info = ARGV[2]}))
local ms = math.ceil(ttl * 1000)
if redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return 1
"""

# KEYS: the model's hash. Returns {id, info JSON, ...} of the live replicas; drops the expired ones.
_LIST_REPLICAS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local entry = cjson.decode(all[i + 1])
  if entry.expires <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, entry.info)
  end
end
return out
"""


def _admission(out: list) -> Admission:
    if int(out[0]) == 1:
        return Admission(True)
    retry = float(out[1])
    return Admission(False, None if retry < 0 else retry, out[2])


def redact_url(url: str) -> str:
    """The URL without its password (redis://user:secret@host → redis://user:***@host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


class RedisStateStore(StateStore):
    """State in Redis at `url` (redis://[[user]:password@]host[:port][/db], rediss://, unix://).

    `prefix` namespaces every key (default "em:"), so one Redis can hold several deployments.
    Connecting is lazy: constructing never fails on an unreachable server; the first command does.
    """

    def __init__(self, url: str, *, prefix: str = "em:", socket_timeout: float = 2.0,
                 connect_timeout: float = 1.0, retries: int = 2) -> None:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        self.description = f"Redis at {redact_url(url)}"
        self.prefix = prefix
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                              redis.exceptions.ReadOnlyError, TimeoutError, ConnectionError)
        self._response_error = redis.exceptions.ResponseError
        try:
            self._r = redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), retries), health_check_interval=10)
        except ValueError as exc:
            raise ValueError(f"--redis-url {redact_url(url)!r} is not a Redis URL: {exc}") from None
        self._admit = self._r.register_script(_ADMIT)
        self._record = self._r.register_script(_RECORD_TOKENS)
        self._reserve = self._r.register_script(_RESERVE)
        self._settle = self._r.register_script(_SETTLE)
        self._create = self._r.register_script(_CREATE)
        self._revoke = self._r.register_script(_REVOKE)
        self._register = self._r.register_script(_REGISTER)
        self._list_replicas = self._r.register_script(_LIST_REPLICAS)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except self._redis_errors as exc:
            raise StateStoreUnavailable(f"the state store ({self.description}) is unreachable: {exc}") from exc
        except self._response_error as exc:
            text = str(exc)
            if text.startswith(("LOADING", "MISCONF", "MASTERDOWN", "READONLY")):
                raise StateStoreUnavailable(f"the state store ({self.description}) cannot serve: {text}") from exc
            raise

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _record_of(self, fields: dict[str, str]) -> KeyRecord | None:
        if not fields:
            return None

        def limit(v: str | None) -> int | None:
            return int(v) if v else None

        revoked = fields.get("revoked_at")
        return KeyRecord(fields["id"], fields["name"], float(fields["created_at"]), limit(fields.get("rpm")),
                         limit(fields.get("tpm")), float(revoked) if revoked else None)

    def ping(self) -> None:
        with self._guard():
            self._r.ping()

    def close(self) -> None:
        self._r.close()

    # ---- API keys
    def create_key(self, name, requests_per_minute=None, tokens_per_minute=None):
        name = _check_name(name)
        rpm = _check_limit(requests_per_minute, "requests_per_minute")
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        raw = new_raw_key()
        digest = hash_key(raw)
        record = KeyRecord(KEY_ID_PREFIX + secrets.token_hex(8), name, time.time(), rpm, tpm)
        with self._guard():
            created = self._create(
                keys=[self._k("key", digest), self._k("keyid", record.id), self._k("keyname", name), self._k("keys")],
                args=[digest, record.id, name, repr(record.created_at), rpm or "", tpm or ""])
        if not created:
            raise ValueError(f"an active key named {name!r} exists already")
        return raw, record

    def list_keys(self):
        with self._guard():
            ids = sorted(self._r.smembers(self._k("keys")))
            if not ids:
                return []
            digests = self._r.mget([self._k("keyid", i) for i in ids])
            pipe = self._r.pipeline(transaction=False)
            for d in digests:
                if d:
                    pipe.hgetall(self._k("key", d))
            rows = pipe.execute()
        records = [r for r in map(self._record_of, rows) if r is not None]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def revoke_key(self, name_or_id):
        with self._guard():
            digest = self._revoke(args=[self.prefix, name_or_id])
            record = self._record_of(self._r.hgetall(self._k("key", digest))) if digest else None
        if record is None:
            raise KeyError(f"no key with id {name_or_id!r} and no active key named {name_or_id!r}")
        return record

    def lookup(self, raw_key):
        with self._guard():
            record = self._record_of(self._r.hgetall(self._k("key", hash_key(raw_key))))
        return None if record is None or record.revoked else record

    def has_keys(self):
        with self._guard():
            return bool(self._r.exists(self._k("keys")))

    # ---- rate limits
    def _rl(self, key_id: str) -> list[str]:
        """The key's rate-limit sets: requests, tokens, reservations (one hash slot: `{key_id}`)."""
        return [self._k("rl", "{" + key_id + "}", part) for part in ("req", "tok", "res")]

    def admit(self, key_id, requests_per_minute, tokens_per_minute, tokens=0):
        rpm = _check_limit(requests_per_minute, "requests_per_minute")
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        tokens = _check_tokens(tokens)
        if rpm is None and tpm is None:
            return Admission(True)
        with self._guard():
            out = self._admit(keys=self._rl(key_id), args=[-1 if rpm is None else rpm, -1 if tpm is None else tpm,
                                                           tokens, uuid.uuid4().hex, WINDOW_S])
        return _admission(out)

    def record_tokens(self, key_id, n):
        if _check_tokens(n) == 0:
            return
        with self._guard():
            self._record(keys=self._rl(key_id)[1:2], args=[n, uuid.uuid4().hex, WINDOW_S])

    def reserve_tokens(self, key_id, tokens_per_minute, tokens):
        tpm = _check_limit(tokens_per_minute, "tokens_per_minute")
        tokens = _check_tokens(tokens)
        if tpm is None:
            return Admission(True)
        reservation = Reservation(key_id, uuid.uuid4().hex, tokens)
        with self._guard():
            out = self._reserve(keys=self._rl(key_id)[1:], args=[tpm, tokens, reservation.id, WINDOW_S,
                                                                 RESERVATION_TTL_S])
        admission = _admission(out)
        return Admission(True, reservation=reservation) if admission.ok else admission

    def settle_tokens(self, reservation, used):
        used = _check_tokens(used)
        with self._guard():
            self._settle(keys=self._rl(reservation.key_id)[1:],
                         args=[reservation.id, reservation.tokens, used, WINDOW_S])

    # ---- registry
    def register_replica(self, model, replica_id, info, ttl_s):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive (got {ttl_s!r})")
        with self._guard():
            self._register(keys=[self._k("replicas", model)], args=[replica_id, json.dumps(info), float(ttl_s)])

    def list_replicas(self, model):
        with self._guard():
            flat = self._list_replicas(keys=[self._k("replicas", model)])
        return {rid: json.loads(info) for rid, info in sorted(zip(flat[::2], flat[1::2]))}

    def unregister_replica(self, model, replica_id):
        with self._guard():
            self._r.hdel(self._k("replicas", model), replica_id)

    # ---- stored responses
    def put_response(self, response_id, record, ttl_s):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive (got {ttl_s!r})")
        text = response_json(record)
        with self._guard():
            self._r.set(self._k("resp", response_id), text, ex=max(1, math.ceil(ttl_s)))

    def get_response(self, response_id):
        with self._guard():
            text = self._r.get(self._k("resp", response_id))
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            log.warning("stored response %s is not JSON; treated as absent", response_id[:64])
            return None
        return record if isinstance(record, dict) else None

    def delete_response(self, response_id):
        with self._guard():
            return bool(self._r.delete(self._k("resp", response_id)))
