"""Webhooks: tools the operator serves as plain HTTP endpoints, and how a receiver checks a call.

A call is one POST of JSON to the registered URL:

    POST /weather HTTP/1.1
    Content-Type: application/json
    X-Expertmesh-Timestamp: 1767225600
    X-Expertmesh-Signature: sha256=5c1f...e9

    {"name": "get_weather", "arguments": {"city": "Paris"}, "call_id": "call_4f0c..."}

The timestamp is always sent; with `secret_env` set, the signature is the hex HMAC-SHA256, keyed
by the secret, of the timestamp, a dot and the exact body bytes (`f"{timestamp}.{body}"`): the
timestamp is signed with the body, so a captured call cannot be replayed later with a fresh one.
A receiver checks both with `verify_webhook_signature`, and refuses a replay within the tolerance
window with a `ReplayCache`:

    from expertmesh.gateway.tools.webhooks import ReplayCache, WebhookSignatureError, verify_webhook_signature

    seen = ReplayCache()
    def handle(headers, body: bytes):
        try:
            verify_webhook_signature(SECRET, headers.get("X-Expertmesh-Timestamp"),
                                     headers.get("X-Expertmesh-Signature"), body, replay_cache=seen)
        except WebhookSignatureError:
            return 401
        ...

The answer: a 2xx response's body is the tool's output: JSON `{"output": ...}` gives that value
(a string as it is, anything else as JSON), `{"error": "..."}` an error the model sees, and any
other body is the output as text. A non-2xx status is an error; a redirect is not followed. The
body is read up to `tool_response_max_bytes` and the call fails past it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import OrderedDict
from typing import Any

import httpx2

from expertmesh.gateway.tools.mcp_client import CallState, CallTransport, ToolFailure, failure

TIMESTAMP_HEADER = "X-Expertmesh-Timestamp"
SIGNATURE_HEADER = "X-Expertmesh-Signature"
SIGNATURE_PREFIX = "sha256="


class WebhookSignatureError(ValueError):
    """A webhook call whose signature does not verify: missing, malformed, wrong, stale or replayed."""


def sign_webhook(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The `X-Expertmesh-Signature` value: "sha256=" + hex HMAC-SHA256(secret, f"{timestamp}.{body}")."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


class ReplayCache:
    """Signatures seen within their tolerance window, so that each verifies once. Entries leave when
    their timestamp is older than the tolerance (a replay of those is refused as stale anyway); at
    `max_entries` the oldest leave first, so size it above the calls expected per window. One
    receiver process; several receivers behind a balancer need a shared store (e.g. Redis SET NX
    with the same expiry) instead."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str, expires_at: float, now: float) -> bool:
        """Record `key` until `expires_at`; False if it is already recorded (a replay)."""
        while self._seen:
            first, first_expiry = next(iter(self._seen.items()))
            if first_expiry > now:
                break
            del self._seen[first]
        if key in self._seen:
            return False
        while len(self._seen) >= self.max_entries:
            self._seen.popitem(last=False)
        self._seen[key] = expires_at
        return True

    def __len__(self) -> int:
        return len(self._seen)


def verify_webhook_signature(secret: str | bytes, timestamp_header: str | None, signature_header: str | None,
                             body: bytes | str, *, tolerance_s: float = 300, now: float | None = None,
                             replay_cache: ReplayCache | None = None) -> None:
    """Check an expertmesh webhook call; WebhookSignatureError saying why it is refused.

    secret: the webhook's secret (the value of its `secret_env`); timestamp_header, signature_header:
    the `X-Expertmesh-Timestamp` and `X-Expertmesh-Signature` values as received; body: the raw
    request body, byte for byte (not re-serialised JSON). Refused: a missing or malformed header, a
    timestamp more than `tolerance_s` from `now` (default: the clock), a signature that does not
    match (compared in constant time), and, given a `replay_cache`, a signature already seen.
    """
    if not timestamp_header or not signature_header:
        raise WebhookSignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    timestamp_header = timestamp_header.strip()
    if not timestamp_header.isdigit() or len(timestamp_header) > 12:
        raise WebhookSignatureError(f"malformed {TIMESTAMP_HEADER} (unix seconds expected)")
    timestamp = int(timestamp_header)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookSignatureError(f"stale timestamp ({now - timestamp:.0f} s from now; tolerance "
                                    f"{tolerance_s:g} s)")
    signature = signature_header.strip()
    if not signature.startswith(SIGNATURE_PREFIX):
        raise WebhookSignatureError(f"malformed {SIGNATURE_HEADER} ({SIGNATURE_PREFIX}<hex> expected)")
    payload = body.encode() if isinstance(body, str) else body
    expected = sign_webhook(secret, timestamp, payload)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise WebhookSignatureError("signature mismatch")
    if replay_cache is not None and not replay_cache.add(expected, timestamp + tolerance_s, now):
        raise WebhookSignatureError("replayed signature")


def _output(data: bytes, content_type: str) -> str:
    """The tool's output of a 2xx body (ToolFailure for {"error": ...})."""
    text = data.decode("utf-8", errors="replace")
    if "json" in content_type or text.lstrip().startswith("{"):
        try:
            value: Any = json.loads(text)
        except (ValueError, RecursionError):
            return text
        if isinstance(value, dict) and value.get("error") is not None:
            error = value["error"]
            raise ToolFailure("error", error if isinstance(error, str) else json.dumps(error, ensure_ascii=False))
        if isinstance(value, dict) and "output" in value:
            output = value["output"]
            return output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    return text


class Webhook:
    """One registered webhook, called over `transport` (a connection pool the caller owns)."""

    def __init__(self, name: str, url: str, headers: dict[str, str], secret: bytes | None,
                 transport: httpx2.AsyncBaseTransport, max_bytes: int) -> None:
        self.name, self.url, self.headers, self.secret = name, url, dict(headers), secret
        self.transport, self.max_bytes = transport, max_bytes

    def request(self, arguments: dict[str, Any], call_id: str, now: float | None = None) -> tuple[bytes, dict]:
        """The body and headers of one call (timestamped; signed when the webhook has a secret)."""
        body = json.dumps({"name": self.name, "arguments": arguments, "call_id": call_id},
                          ensure_ascii=False, separators=(",", ":")).encode()
        timestamp = int(time.time() if now is None else now)
        headers = {**self.headers, "Content-Type": "application/json", "User-Agent": "expertmesh-webhook",
                   TIMESTAMP_HEADER: str(timestamp)}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign_webhook(self.secret, timestamp, body)
        return body, headers

    async def call(self, arguments: dict[str, Any], call_id: str, timeout_s: float) -> str:
        """POST the call; the tool's output, or ToolFailure."""
        body, headers = self.request(arguments, call_id)
        state = CallState(self.max_bytes)
        try:
            async with httpx2.AsyncClient(transport=CallTransport(self.transport, state), trust_env=False,
                                          follow_redirects=False, timeout=httpx2.Timeout(timeout_s)) as http:
                response = await http.post(self.url, content=body, headers=headers)
        except Exception as exc:
            raise failure(exc, state) from None
        if response.is_redirect:
            raise ToolFailure("error", f"the webhook answered a redirect (HTTP {response.status_code}), which is "
                                       "not followed")
        content_type = response.headers.get("content-type", "")
        if not response.is_success:
            try:  # a JSON {"error": ...} names the problem; any other body stays with the webhook
                _output(response.content, content_type)
            except ToolFailure as exc:
                raise ToolFailure("error", f"HTTP {response.status_code}: {exc.message}") from None
            raise ToolFailure("error", f"the webhook answered HTTP {response.status_code}")
        return _output(response.content, content_type)
