"""Standard Webhooks signing and delivery (jobs.webhooks) against a real loopback HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from jobs.webhooks import (
    WebhookError,
    WebhookVerificationError,
    checked_secret,
    deliver,
    generate_secret,
    sign,
    sign_headers,
    validate_url,
    verify,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Receiver:
    url: str
    fail_first: int = 0
    received: list[dict] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verify(SECRET, headers, body)
                state.verified.append(True)
            except WebhookVerificationError:
                state.verified.append(False)
            state.received.append({"headers": headers, "body": json.loads(body)})
            code = 503 if len(state.received) <= state.fail_first else 204
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_sign_matches_the_spec_formula() -> None:
    body = b'{"a":1}'
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert sign(SECRET, "msg_1", 1700000000, body) == "v1," + base64.b64encode(mac).decode()


def test_verify_accepts_and_rejects() -> None:
    body = '{"type":"job.succeeded"}'
    now = 1_700_000_000
    headers = sign_headers(SECRET, body, msg_id="msg_x", timestamp=now)
    verify(SECRET, headers, body, now=now + 10)
    # several signatures (key rotation): one valid is enough
    multi = {**headers, "webhook-signature": "v1,AAAA " + headers["webhook-signature"]}
    verify(SECRET, multi, body, now=now)
    cases = [
        (headers, body + " ", now),  # body tampered
        ({**headers, "webhook-id": "msg_y"}, body, now),  # id tampered
        ({**headers, "webhook-timestamp": str(now + 1)}, body, now),  # timestamp tampered
        (headers, body, now + 301),  # too old
        (headers, body, now - 301),  # from the future
        ({k: v for k, v in headers.items() if k != "webhook-signature"}, body, now),
        ({**headers, "webhook-timestamp": "soon"}, body, now),
    ]
    for h, b, t in cases:
        with pytest.raises(WebhookVerificationError):
            verify(SECRET, h, b, now=t)
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), headers, body, now=now)


def test_secrets() -> None:
    s = generate_secret()
    assert s.startswith("whsec_") and len(base64.b64decode(s[6:])) == 32
    for bad in ("whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(WebhookError):
            sign(bad, "m", 1, b"")
    assert checked_secret(None) is None
    assert checked_secret(SECRET) == SECRET
    with pytest.raises(WebhookError):
        checked_secret("nope!")


def test_delivery_is_signed_and_verified(receiver: Receiver) -> None:
    attempts = deliver(
        receiver.url, SECRET, "job.succeeded", {"job_id": "j1", "status": "succeeded"}, allow_private=True
    )
    assert [(a.attempt, a.status, a.ok) for a in attempts] == [(1, 204, True)]
    assert receiver.verified == [True]
    msg = receiver.received[0]
    assert msg["body"]["type"] == "job.succeeded" and msg["body"]["data"]["job_id"] == "j1"
    assert msg["headers"]["content-type"] == "application/json"
    assert abs(int(msg["headers"]["webhook-timestamp"]) - time.time()) < 5
    assert attempts[0].to_dict()["duration_s"] >= 0


def test_fails_twice_then_succeeds(receiver: Receiver) -> None:
    receiver.fail_first = 2
    sleeps: list[float] = []
    attempts = deliver(
        receiver.url, SECRET, "job.failed", {"job_id": "j2"}, 5, 0.5, sleep=sleeps.append, allow_private=True
    )
    assert [(a.attempt, a.status, a.ok) for a in attempts] == [
        (1, 503, False),
        (2, 503, False),
        (3, 204, True),
    ]
    assert attempts[0].error == "HTTP 503" and attempts[2].error is None
    assert sleeps == [0.5, 1.0]
    assert receiver.verified == [True, True, True]
    ids = {r["headers"]["webhook-id"] for r in receiver.received}
    assert len(ids) == 1  # same message id on every retry


def test_always_failing_gives_up(receiver: Receiver) -> None:
    receiver.fail_first = 100
    attempts = deliver(
        receiver.url, SECRET, "job.failed", {}, max_attempts=4, backoff=0.01, allow_private=True
    )
    assert len(attempts) == 4 and not any(a.ok for a in attempts)
    assert len(receiver.received) == 4


def test_connection_refused_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    attempts = deliver(
        f"http://127.0.0.1:{port}/", SECRET, "job.succeeded", {}, 3, 1.0,
        max_backoff=1.5, sleep=sleeps.append, allow_private=True,
    )  # fmt: skip
    assert [a.status for a in attempts] == [None, None, None]
    assert all(a.error and "Connect" in a.error for a in attempts)
    assert sleeps == [1.0, 1.5]


def test_validate_url() -> None:
    validate_url("http://127.0.0.1:8080/x", allow_private=True)
    for bad in ("ftp://example.com/", "http:///x", "https://user:pw@example.com/"):
        with pytest.raises(WebhookError):
            validate_url(bad, allow_private=True)
    for private in (
        "http://127.0.0.1/",
        "http://10.1.2.3/",
        "http://169.254.169.254/latest",
        "http://[::1]/",
    ):
        with pytest.raises(WebhookError):
            validate_url(private)


# -- send-time address checks (DNS rebinding) ----------------------------------------------------


class Resolver:
    """A stand-in for the system resolver (socket.getaddrinfo) whose answers for one name change."""

    def __init__(self, name: str, answers: list[str]) -> None:
        self.name, self.answers, self.asked = name, answers, 0
        self.real = socket.getaddrinfo

    def __call__(self, host, port, *args, **kwargs):
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        addr = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]


def test_rebinding_to_loopback_after_submit_is_refused_at_send_time(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = urlsplit(receiver.url).port
    name = "hooks.rebind.test"
    resolver = Resolver(name, ["93.184.216.34", "127.0.0.1"])  # public at submit, loopback at send
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://{name}:{port}/hook"
    validate_url(url)  # the submit-time check passes
    attempts = deliver(url, SECRET, "job.succeeded", {"job_id": "j"}, max_attempts=3, backoff=0.01)
    assert [a.ok for a in attempts] == [False]  # refused once, not retried
    assert attempts[0].error and "non-public" in attempts[0].error
    assert receiver.received == []


def test_delivery_connects_to_the_checked_address_without_resolving_again(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = urlsplit(receiver.url).port
    name = "hooks.pinned.test"  # not in any DNS: only the stand-in resolver knows it
    resolver = Resolver(name, ["127.0.0.1", "10.9.9.9"])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    attempts = deliver(f"http://{name}:{port}/hook", SECRET, "job.succeeded", {}, allow_private=True)
    assert [a.ok for a in attempts] == [True]
    assert resolver.asked == 1  # resolved once; the connection went to that answer
    assert receiver.received[0]["headers"]["host"] == f"{name}:{port}"
    assert receiver.verified == [True]
