"""The state store (cluster/state.py): one suite, run against the in-process backend and against a
real `redis-server` that these tests start (`.ci/run` installs it from Debian).

Keys, hashed storage, rate limits under concurrent threads and processes, the replica registry,
the Authenticator over the store, and Redis going away and coming back.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest
from conftest import start_redis_server

from expertmesh.cluster.collective import free_port
from expertmesh.cluster.state import (
    RESERVATION_TTL_S,
    WINDOW_S,
    InProcessStateStore,
    KeyRecord,
    RedisStateStore,
    StateStore,
    StateStoreUnavailable,
    hash_key,
    make_state_store,
    redact_url,
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request) -> StateStore:
    if request.param == "memory":
        yield InProcessStateStore()
        return
    server = request.getfixturevalue("redis_server")
    with server.client() as c:
        c.flushall()
    s = RedisStateStore(server.url)
    yield s
    s.close()


# ---- API keys ------------------------------------------------------------------------------

def test_create_lookup_list_revoke(store):
    raw, rec = store.create_key("alice", requests_per_minute=10, tokens_per_minute=1000)
    assert raw.startswith("em-") and len(raw) == 3 + 32
    assert rec.id.startswith("key_") and rec.name == "alice" and not rec.revoked
    assert (rec.requests_per_minute, rec.tokens_per_minute) == (10, 1000)
    assert store.lookup(raw) == rec
    assert store.lookup(raw + "x") is None and store.lookup("em-" + "A" * 32) is None
    raw_b, rec_b = store.create_key("bob")
    assert raw_b != raw and rec_b.id != rec.id and not rec_b.limited
    assert [r.id for r in store.list_keys()] == [rec.id, rec_b.id]
    assert store.has_keys()

    revoked = store.revoke_key("alice")  # by name
    assert revoked.id == rec.id and revoked.revoked and revoked.revoked_at >= rec.created_at
    assert store.lookup(raw) is None, "a revoked key is not valid"
    assert store.revoke_key(rec.id).revoked_at == revoked.revoked_at, "revoking again changes nothing"
    with pytest.raises(KeyError, match="alice"):
        store.revoke_key("alice")  # no active key of that name any more
    assert store.revoke_key(rec_b.id).revoked  # by id
    assert store.lookup(raw_b) is None
    keys = store.list_keys()
    assert [r.revoked for r in keys] == [True, True] and store.has_keys(), "revoked keys stay listed"
    assert keys[0].to_dict()["revoked"] is True

    raw_c, rec_c = store.create_key("alice")  # the name is free again
    assert store.lookup(raw_c) == rec_c and rec_c.id != rec.id
    with pytest.raises(KeyError):
        store.revoke_key("nobody")


def test_key_names_and_limits_are_checked(store):
    assert not store.has_keys()
    store.create_key("dup")
    with pytest.raises(ValueError, match="exists already"):
        store.create_key("dup")
    for bad in ("", "   ", "key_abc", "x" * 101, "tab\there"):
        with pytest.raises(ValueError):
            store.create_key(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            store.create_key("limits", requests_per_minute=bad)
        with pytest.raises(ValueError):
            store.create_key("limits", tokens_per_minute=bad)
    assert [r.name for r in store.list_keys()] == ["dup"]


def test_raw_key_is_stored_nowhere(store, request):
    raws = [store.create_key(f"k{i}", requests_per_minute=5, tokens_per_minute=50)[0] for i in range(3)]
    store.revoke_key("k1")
    for raw in raws:
        rec = store.lookup(raw)
        if rec is not None:
            assert store.admit(rec.id, 5, 50, 3).ok
            store.record_tokens(rec.id, 4)
    store.register_replica("m", "r0", {"address": "10.0.0.1"}, 30)
    if isinstance(store, RedisStateStore):
        dump = _dump_redis(request.getfixturevalue("redis_server").client())
        assert any(hash_key(raws[0]) in d for d in dump), "the digest is what is stored"
    else:
        dump = [repr(vars(store))]
    for raw in raws:
        secret = raw[len("em-"):]
        assert not any(raw in d or secret in d for d in dump), "the raw key must never be stored"


def _dump_redis(client) -> list[str]:
    """Every key and every value in Redis, as text."""
    out = []
    for key in client.scan_iter("*"):
        out.append(key)
        kind = client.type(key)
        if kind == "string":
            out.append(client.get(key))
        elif kind == "hash":
            out.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
        elif kind == "set":
            out.extend(client.smembers(key))
        elif kind == "zset":
            out.extend(f"{m}@{s}" for m, s in client.zrange(key, 0, -1, withscores=True))
        elif kind == "list":
            out.extend(client.lrange(key, 0, -1))
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {key}")
    assert out, "Redis holds the state"
    return out


# ---- rate limits ---------------------------------------------------------------------------

def _hammer(store: StateStore, key_id: str, rpm, tpm, tokens: int, threads: int, calls: int):
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def run():
        barrier.wait()
        mine = [store.admit(key_id, rpm, tpm, tokens) for _ in range(calls)]
        with lock:
            results.extend(mine)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def test_requests_per_minute_under_threads(store):
    _, rec = store.create_key("rpm", requests_per_minute=25)
    results = _hammer(store, rec.id, 25, None, 0, threads=8, calls=10)
    assert sum(a.ok for a in results) == 25, "exactly the limit is admitted"
    refused = [a for a in results if not a.ok]
    assert len(refused) == 55
    assert all(0 < a.retry_after_s <= WINDOW_S and a.reason == "requests" for a in refused)
    assert not store.admit(rec.id, 25, None).ok
    assert store.admit("another-key", 25, None).ok, "limits are per key"


def test_tokens_per_minute_under_threads(store):
    _, rec = store.create_key("tpm", tokens_per_minute=100)
    results = _hammer(store, rec.id, None, 100, 7, threads=8, calls=5)
    assert sum(a.ok for a in results) == 14, "14 requests of 7 tokens fit in 100"
    assert all(0 < a.retry_after_s <= WINDOW_S and a.reason == "tokens" for a in results if not a.ok)
    too_large = store.admit(rec.id, None, 100, 101)
    assert not too_large.ok and too_large.retry_after_s is None and too_large.reason == "too_large"

    # counted after the fact: admitted while under the limit, refused once the usage reaches it
    _, rec = store.create_key("used", requests_per_minute=100, tokens_per_minute=50)
    assert store.admit(rec.id, 100, 50, 0).ok
    store.record_tokens(rec.id, 49)
    assert store.admit(rec.id, 100, 50, 0).ok
    store.record_tokens(rec.id, 30)  # overshoots: the request was already running
    refused = store.admit(rec.id, 100, 50, 0)
    assert not refused.ok and refused.reason == "tokens" and 0 < refused.retry_after_s <= WINDOW_S


def _reserve_many(store: StateStore, key_id: str, tpm: int, tokens: int, threads: int, calls: int):
    results, lock, barrier = [], threading.Lock(), threading.Barrier(threads)

    def run():
        barrier.wait()
        mine = [store.reserve_tokens(key_id, tpm, tokens) for _ in range(calls)]
        with lock:
            results.extend(mine)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


def test_token_reservations_under_threads(store):
    """16 threads reserve a request's most tokens (110) 4 times each under 1,000 tokens per minute:
    exactly 9 fit; settling refunds what was not used, once."""
    _, rec = store.create_key("reserve", tokens_per_minute=1000)
    results = _reserve_many(store, rec.id, 1000, 110, threads=16, calls=4)
    held = [a.reservation for a in results if a.ok]
    assert len(held) == 9 and len({r.id for r in held}) == 9, "990 of 1,000 tokens are held"
    assert all(not a.ok and a.reason == "tokens" and 0 < a.retry_after_s <= WINDOW_S for a in results if not a.ok)
    assert not store.admit(rec.id, None, 1000, 20).ok, "admission counts the open reservations"
    for r in held:
        store.settle_tokens(r, 10)
        store.settle_tokens(r, 10)  # twice: changes nothing
    again = _reserve_many(store, rec.id, 1000, 110, threads=4, calls=4)
    assert sum(a.ok for a in again) == 8, "90 tokens used: 8 more requests of 110 fit"
    too_large = store.reserve_tokens(rec.id, 1000, 1001)
    assert not too_large.ok and too_large.retry_after_s is None and too_large.reason == "too_large"
    unlimited = store.reserve_tokens(rec.id, None, 10**6)
    assert unlimited.ok and unlimited.reservation is None


def test_reservations_expire_and_age_out():
    now = [1000.0]
    store = InProcessStateStore(clock=lambda: now[0])
    first = store.reserve_tokens("k", 100, 60)
    refused = store.reserve_tokens("k", 100, 60)
    assert first.ok and not refused.ok and refused.retry_after_s == pytest.approx(WINDOW_S)
    store.settle_tokens(first.reservation, 30)  # 30 used, 30 refunded
    second = store.reserve_tokens("k", 100, 60)
    assert second.ok and not store.reserve_tokens("k", 100, 20).ok
    now[0] += RESERVATION_TTL_S  # the log aged out and the open reservation expired
    store.settle_tokens(second.reservation, 60)  # too late: logs nothing
    assert store.reserve_tokens("k", 100, 100).ok


def _reserve_in_process(url: str, key_id: str, calls: int, barrier, results) -> None:
    store = RedisStateStore(url)
    store.ping()
    barrier.wait()
    results.put(sum(store.reserve_tokens(key_id, 1000, 110).ok for _ in range(calls)))


def test_token_reservations_across_processes(redis_server):
    redis_server.flush()
    store = RedisStateStore(redis_server.url)
    _, rec = store.create_key("procs-tokens", tokens_per_minute=1000)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_reserve_in_process, args=(store.url, rec.id, 6, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    admitted = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(admitted) == 9, f"each process reserved {admitted} times 110 of 1,000 tokens"


def _admit_in_process(url: str, key_id: str, rpm: int, calls: int, barrier, results) -> None:
    store = RedisStateStore(url)
    store.ping()
    barrier.wait()
    results.put(sum(store.admit(key_id, rpm, None).ok for _ in range(calls)))


def test_requests_per_minute_across_processes(store):
    if not isinstance(store, RedisStateStore):
        pytest.skip("the in-process store is one process's by definition")
    _, rec = store.create_key("procs", requests_per_minute=40)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_admit_in_process, args=(store.url, rec.id, 40, 30, barrier, results))
             for _ in range(3)]
    for p in procs:
        p.start()
    admitted = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(admitted) == 40, f"each process admitted {admitted}"
    assert not store.admit(rec.id, 40, None).ok


def test_window_slides():
    now = [1000.0]
    store = InProcessStateStore(clock=lambda: now[0])
    for t in (0, 10, 20):
        now[0] = 1000.0 + t
        assert store.admit("k", 3, None).ok
    now[0] = 1030.0
    refused = store.admit("k", 3, None)
    assert not refused.ok and refused.retry_after_s == pytest.approx(30.0)
    now[0] = 1059.999
    assert not store.admit("k", 3, None).ok
    now[0] = 1060.0  # the first request is 60 s old: out of the window
    assert store.admit("k", 3, None).ok
    assert not store.admit("k", 3, None).ok

    store.record_tokens("t", 60)
    now[0] = 1070.0
    store.record_tokens("t", 30)
    refused = store.admit("t", None, 80, 10)  # 90 used + 10 > 80: the 60 must age out (at 1120)
    assert not refused.ok and refused.retry_after_s == pytest.approx(50.0)
    now[0] = 1120.0
    assert store.admit("t", None, 80, 10).ok


# ---- registry ------------------------------------------------------------------------------

def test_replica_registry(store):
    assert store.list_replicas("qwen") == {}
    store.register_replica("qwen", "r1", {"address": "10.0.0.1:8000", "ep_size": 2}, ttl_s=30)
    store.register_replica("qwen", "r0", {"address": "10.0.0.2:8000"}, ttl_s=0.3)
    store.register_replica("other", "r9", {}, ttl_s=30)
    assert store.list_replicas("qwen") == {"r0": {"address": "10.0.0.2:8000"},
                                           "r1": {"address": "10.0.0.1:8000", "ep_size": 2}}
    time.sleep(0.4)
    assert list(store.list_replicas("qwen")) == ["r1"], "an expired registration drops out"
    store.register_replica("qwen", "r1", {"address": "10.0.0.3:8000"}, ttl_s=30)
    assert store.list_replicas("qwen") == {"r1": {"address": "10.0.0.3:8000"}}
    store.unregister_replica("qwen", "r1")
    store.unregister_replica("qwen", "missing")
    assert store.list_replicas("qwen") == {} and list(store.list_replicas("other")) == ["r9"]


# ---- the gateway's Authenticator over the store --------------------------------------------

def _check(auth, token):
    return asyncio.run(auth.check(token))


def _api_error(call):
    from expertmesh.gateway.protocol import APIError

    with pytest.raises(APIError) as info:
        asyncio.run(call)
    return info.value


def test_authenticator_over_the_store(store):
    from expertmesh.gateway.auth import NO_STORE_KEYS, Authenticator, current_key

    auth = Authenticator(store=store, keys_cache_s=0)
    assert auth.enabled
    for token in (None, "anything"):
        assert _api_error(auth.check(token)).status == 401, "a key store with no key admits nobody"
    assert asyncio.run(auth.status()) == NO_STORE_KEYS
    raw, rec = store.create_key("limited", requests_per_minute=2, tokens_per_minute=100)
    assert asyncio.run(auth.status()) == "on: 1 key in the store"
    assert _api_error(auth.check(None)).status == 401
    assert _api_error(auth.check("em-wrong")).status == 401
    assert _check(auth, raw) == rec
    assert asyncio.run(auth.check_http(f"Bearer {raw}")) == rec
    err = _api_error(auth.check(raw))
    assert err.status == 429 and err.code == "rate_limit_exceeded" and "2 requests per minute" in err.message
    assert 1 <= int(err.headers["Retry-After"]) <= 60

    raw_t, rec_t = store.create_key("tokens", tokens_per_minute=100)

    async def request(tokens, used):
        assert await auth.check(raw_t) == rec_t and current_key.get() == rec_t
        reservation = await auth.reserve(tokens)
        await auth.settle(reservation, used)

    asyncio.run(request(100, 100))  # the whole budget, used
    err = _api_error(auth.check(raw_t))
    assert err.status == 429 and err.type == "tokens" and "Retry-After" in err.headers
    err = _api_error(auth.reserve(500, rec_t))
    assert err.status == 429 and "Retry-After" not in err.headers, "it can never fit: no retry"
    assert "more than its limit of 100 tokens per minute" in err.message

    store.revoke_key("limited")
    assert _api_error(auth.check(raw)).status == 401
    store.revoke_key("tokens")
    assert _api_error(auth.check(None)).status == 401, "revoking every key leaves the API closed"
    assert asyncio.run(auth.status()) == NO_STORE_KEYS

    static = Authenticator(["static-key"], store=store)
    assert _check(static, "static-key") is None
    assert _api_error(static.check(raw_t)).status == 401


def test_empty_key_store_refuses_and_says_so(store, request, caplog):
    """Keys created, then the store loses them (FLUSHALL; a new in-process store): a key is still
    required, every request gets 401, the log warns and the status says why."""
    from expertmesh.gateway.auth import NO_STORE_KEYS, Authenticator

    raw, rec = store.create_key("before-the-flush")
    auth = Authenticator(store=store, keys_cache_s=0)
    assert _check(auth, raw) == rec
    if isinstance(store, RedisStateStore):
        request.getfixturevalue("redis_server").flush()
    else:
        auth = Authenticator(store=InProcessStateStore(), keys_cache_s=0)
    with caplog.at_level("WARNING", logger="expertmesh.gateway.auth"):
        for token in (None, "anything", raw):
            err = _api_error(auth.check(token))
            assert err.status == 401 and err.code == "invalid_api_key"
        assert asyncio.run(auth.status()) == NO_STORE_KEYS
    assert "holds no valid key, so every request is refused" in caplog.text
    assert Authenticator(["static"], store=store).enabled


def test_authenticator_static_keys_only():
    from expertmesh.gateway.auth import Authenticator
    from expertmesh.gateway.auth import hash_key as auth_hash_key

    assert auth_hash_key is hash_key
    assert not Authenticator().enabled and _check(Authenticator(), None) is None
    assert asyncio.run(Authenticator().status()).startswith("off")
    auth = Authenticator(["k1", "k2"])
    assert auth.enabled and _check(auth, "k2") is None
    assert _api_error(auth.check(None)).status == 401
    assert _api_error(auth.check("k3")).headers["WWW-Authenticate"] == "Bearer"


def test_make_state_store_and_redacted_urls():
    assert isinstance(make_state_store(None), InProcessStateStore)
    assert isinstance(make_state_store(""), InProcessStateStore)
    store = make_state_store("redis://:hunter2@127.0.0.1:1/0")
    assert isinstance(store, RedisStateStore) and "hunter2" not in store.description
    assert redact_url("redis://user:pw@h:6379/1") == "redis://user:***@h:6379/1"
    assert redact_url("redis://h:6379") == "redis://h:6379"
    with pytest.raises(StateStoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1:1/0"):
        store.ping()
    with pytest.raises(ValueError, match="not a Redis URL"):
        make_state_store("http://example.com")


# ---- Redis going away and coming back ------------------------------------------------------

def test_redis_outage_and_restart(tmp_path):
    from expertmesh.gateway.auth import Authenticator

    server = start_redis_server(tmp_path)
    try:
        store = RedisStateStore(server.url)
        raw, rec = store.create_key("survivor", requests_per_minute=3)
        _, gone = store.create_key("gone")
        store.revoke_key(gone.id)
        assert store.admit(rec.id, 3, None).ok
        auth = Authenticator(["static-key"], store=store)

        server.stop()
        calls = [lambda: store.lookup(raw), store.list_keys, lambda: store.create_key("new"),
                 lambda: store.revoke_key("survivor"), lambda: store.admit(rec.id, 3, None),
                 lambda: store.record_tokens(rec.id, 5), store.has_keys, store.ping,
                 lambda: store.register_replica("m", "r", {}, 10), lambda: store.list_replicas("m")]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(StateStoreUnavailable, match=f"Redis at {server.url}.* unreachable"):
                call()
            assert time.monotonic() - start < 5, "an outage is reported quickly"
        err = _api_error(auth.check(raw))
        assert err.status == 503 and err.type == "server_error" and err.code == "state_store_unavailable"
        assert f"127.0.0.1:{server.port}" not in err.message, "the store's address stays in the log"
        assert _check(auth, "static-key") is None, "static keys need no store"

        server.start()  # same port, same directory: the append-only file is replayed
        assert store.lookup(raw) == rec, "the same client works again"
        assert [(r.id, r.revoked) for r in store.list_keys()] == [(rec.id, False), (gone.id, True)]
        assert store.admit(rec.id, 3, None).ok
        assert _check(auth, raw) == rec
        assert _api_error(auth.check(raw)).status == 429, "the rate-limit log survived the restart too"
    finally:
        server.stop()


def test_key_record_roundtrip():
    rec = KeyRecord("key_1", "n", 1.0, None, 5)
    assert rec.limited and not rec.revoked and rec.to_dict()["tokens_per_minute"] == 5


# ---- `expertmesh keys` ---------------------------------------------------------------------

def test_keys_cli(redis_server, capsys):
    import json

    from expertmesh.gateway.cli import main

    with redis_server.client() as c:
        c.flushall()
    url = ["--redis-url", redis_server.url]
    assert main(["keys", "create", "ci-bot", "--rpm", "60", "--tpm", "5000", *url]) == 0
    out = capsys.readouterr()
    raw = out.out.strip()
    assert raw.startswith("em-") and "shown only this once" in out.err
    assert main(["keys", "create", "other", "--json", *url]) == 0
    other = json.loads(capsys.readouterr().out)
    store = RedisStateStore(redis_server.url)
    assert store.lookup(raw).requests_per_minute == 60 and store.lookup(other["key"]).id == other["id"]

    assert main(["keys", "list", *url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "NAME", "RPM", "TPM", "CREATED", "STATUS"]
    assert "ci-bot" in table[1] and "5000" in table[1] and table[1].endswith("active") and len(table) == 3
    assert raw not in "\n".join(table)

    assert main(["keys", "revoke", "ci-bot", *url]) == 0
    assert "Revoked key 'ci-bot'" in capsys.readouterr().out
    assert store.lookup(raw) is None
    assert main(["keys", "revoke", "ci-bot", *url]) == 1
    assert "no active key named 'ci-bot'" in capsys.readouterr().err
    assert main(["keys", "list", "--json", *url]) == 0
    assert [json.loads(line)["revoked"] for line in capsys.readouterr().out.splitlines()] == [True, False]

    assert main(["keys", "list"]) == 2
    assert "needs --redis-url" in capsys.readouterr().err
    assert main(["keys", "create", "x", "--rpm", "0", *url]) == 2
    assert "--rpm must be a positive integer" in capsys.readouterr().err
    assert main(["keys", "list", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 1
    assert "unreachable" in capsys.readouterr().err
