"""prunectl without the service: argument parsing, exit codes, SSE parsing, verified downloads."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prunectl.cli import EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_VERIFY, build_body, build_parser, main
from prunectl.client import Client, VerificationError, download_artifacts, parse_sse, safe_relpath


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_body_from_flags() -> None:
    args = build_parser().parse_args(
        ["submit", "--model", "org/m", "--method", "sparsegpt", "--pattern", "2:4", "--calibration", "c4",
         "--nsamples", "16", "--seqlen", "128", "--seed", "3", "--eval-windows", "4", "--ignore", "lm_head",
         "--ignore", "model.layers.0.*", "--no-dense-baseline"]
    )  # fmt: skip
    assert build_body(args) == {
        "model": {"source": "org/m"},
        "prune": {"method": "sparsegpt", "pattern": "2:4", "ignore": ["lm_head", "model.layers.0.*"]},
        "calibration": {"source": "c4", "nsamples": 16, "seqlen": 128, "seed": 3},
        "evaluation": {"max_windows": 4, "dense_baseline": False},
    }


def test_spec_file_with_overrides(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model:\n  source: org/base\nprune:\n  method: wanda\n  sparsity: 0.5\n")
    args = build_parser().parse_args(["submit", "--spec", str(spec), "--sparsity", "0.6", "--no-eval"])
    assert build_body(args) == {
        "model": {"source": "org/base"},
        "prune": {"method": "wanda", "sparsity": 0.6},
        "evaluation": {"enabled": False},
    }
    js = tmp_path / "spec.json"
    js.write_text(json.dumps({"model": {"source": "/models/x"}}))
    args = build_parser().parse_args(["submit", "--spec", str(js), "--model", "org/y"])
    assert build_body(args)["model"]["source"] == "org/y"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["submit"],  # no model
        ["submit", "--model", "m", "--sparsity", "1.5"],
        ["submit", "--model", "m", "--sparsity", "half"],
        ["submit", "--model", "m", "--nsamples", "0"],
        ["submit", "--model", "m", "--method", "obs"],
        ["submit", "--model", "m", "--download", "out"],  # --download needs --wait
        ["status"],
        ["list", "--status", "exploded"],
        ["--url", "ftp://x", "status", "abc"],
    ],
)
def test_bad_input_exits_2(argv: list[str]) -> None:
    if argv[:1] != ["--url"]:
        argv = [*argv, "--url", f"http://127.0.0.1:{_closed_port()}"]
    code, _, err = _run(*argv)
    assert code == EXIT_BAD_INPUT, err


def test_bad_spec_files_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    for f in ("bad.yaml", "list.json", "missing.yaml"):
        code, _, err = _run("submit", "--spec", str(tmp_path / f))
        assert code == EXIT_BAD_INPUT and "prunectl:" in err


@pytest.mark.parametrize(
    "argv",
    [["submit", "--model", "org/m"], ["status", "abc"], ["list"], ["cancel", "abc"], ["events", "abc"]],
)
def test_unreachable_exits_3(argv: list[str]) -> None:
    code, _, err = _run("--url", f"http://127.0.0.1:{_closed_port()}", "--retries", "2", *argv)
    assert code == EXIT_UNREACHABLE
    assert "unreachable" in err


def test_env_url_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("PRUNE_API_KEY", "k")
    code, _, err = _run("status", "abc", "--retries", "1")
    assert (code == EXIT_UNREACHABLE and "127.0.0.1" not in err) or code == EXIT_UNREACHABLE


def test_parse_sse() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 1-0",
        "event: status",
        'data: {"status":"running"}',
        "",
        "id: 2-0",
        "event: progress",
        'data: {"stage":"pruning",',
        'data: "fraction":0.5}',
        "",
    ]
    assert list(parse_sse(iter(lines))) == [
        {"id": "1-0", "type": "status", "data": {"status": "running"}},
        {"id": "2-0", "type": "progress", "data": {"stage": "pruning", "fraction": 0.5}},
    ]


def test_safe_relpath() -> None:
    assert str(safe_relpath("model/config.json")) == "model/config.json"
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "./a"):
        with pytest.raises(VerificationError):
            safe_relpath(bad)


# -- downloads against a real local HTTP server --------------------------------------------------


@pytest.fixture
def file_server() -> Iterator[tuple[str, dict[str, bytes], list[dict]]]:
    files: dict[str, bytes] = {}
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "auth": self.headers.get("authorization")})
            data = files.get(self.path.split("?")[0].lstrip("/"))
            if data is None:
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files, seen
    finally:
        server.shutdown()
        server.server_close()


def _artifacts(base: str, files: dict[str, bytes], truth: dict[str, bytes] | None = None) -> list[dict]:
    truth = truth or files
    return [
        {
            "name": n,
            "size": len(truth[n]),
            "sha256": hashlib.sha256(truth[n]).hexdigest(),
            "url": f"{base}/{n}?s=1",
        }
        for n in sorted(files)
    ]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _job_files() -> dict[str, bytes]:
    model = {"model/config.json": b"{}", "model/model.safetensors": b"\x00" * 5000, "report.json": b"{}"}
    manifest = {
        "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in model.items()}
    }
    return {**model, "manifest.json": json.dumps(manifest).encode()}


def test_download_verifies_and_keeps_files(file_server, tmp_path: Path) -> None:
    base, files, seen = file_server
    files.update(_job_files())
    with Client(base, "secret-key", retries=2, backoff=0.01) as client:
        download_artifacts(client._fetch, _artifacts(base, files), tmp_path / "out")
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging directory beside it is gone
    # same origin as the API: the key is sent
    assert all(s["auth"] == "Bearer secret-key" for s in seen)


def test_key_not_sent_to_other_origins(file_server, tmp_path: Path) -> None:
    base, files, seen = file_server
    files.update(_job_files())
    with Client(f"http://127.0.0.1:{_closed_port()}", "secret-key") as client:
        download_artifacts(client._fetch, _artifacts(base, files), tmp_path / "out")
    assert seen[0]["auth"] is None


def test_corrupted_file_is_refused_and_not_kept(file_server, tmp_path: Path) -> None:
    base, files, _ = file_server
    files.update(_job_files())
    truth = dict(files)
    files["model/model.safetensors"] = b"\x00" * 4999 + b"\x01"  # same size, different content
    out = tmp_path / "out"
    with Client(base, retries=1) as client, pytest.raises(VerificationError, match=r"model\.safetensors"):
        download_artifacts(client._fetch, _artifacts(base, files, truth), out)
    assert list(out.rglob("*")) == []


def test_manifest_mismatch_is_refused(file_server, tmp_path: Path) -> None:
    base, files, _ = file_server
    files.update(_job_files())
    files["report.json"] = b'{"tampered": 1}'  # the artifact list agrees, the manifest does not
    out = tmp_path / "out"
    with Client(base, retries=1) as client, pytest.raises(VerificationError, match="manifest"):
        download_artifacts(client._fetch, _artifacts(base, files), out)
    assert list(out.rglob("*")) == []


def test_download_command_exit_codes(file_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prunectl download` end to end against a server that also answers the two API routes."""
    base, files, _ = file_server
    files.update(_job_files())
    truth = dict(files)
    files["v1/jobs/abc"] = json.dumps({"id": "abc", "status": "succeeded"}).encode()
    listing = {"job_id": "abc", "artifacts": _artifacts(base, {k: v for k, v in truth.items()})}
    files["v1/jobs/abc/artifacts"] = json.dumps(listing).encode()
    code, _, err = _run("--url", base, "download", "abc", str(tmp_path / "ok"))
    assert code == 0, err
    assert (tmp_path / "ok" / "manifest.json").read_bytes() == truth["manifest.json"]
    files["model/config.json"] = b"{ }"  # corrupt one file on the server
    code, _, err = _run("--url", base, "download", "abc", str(tmp_path / "bad"))
    assert code == EXIT_VERIFY and "model/config.json" in err
    assert not (tmp_path / "bad" / "model" / "config.json").exists()
    code, _, err = _run("--url", base, "--retries", "1", "download", "nope", str(tmp_path / "x"))
    assert code == EXIT_BAD_INPUT and "404" in err


# -- retries: 429 / 503 with Retry-After, total --timeout -----------------------------------------


def test_retry_after_and_backoff() -> None:
    import httpx

    from prunectl.client import backoff_delay, retry_after

    def resp(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": value} if value else {})

    assert retry_after(resp("3")) == 3.0
    assert retry_after(resp(None)) is None
    assert retry_after(resp("soon")) is None
    assert retry_after(resp("Wed, 21 Oct 2015 07:28:00 GMT"), now=1445412470.0) == 10.0
    assert retry_after(resp("99999")) == 300.0  # capped
    assert [backoff_delay(a, 0.5, None) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delay(1, 0.5, 7.0) == 7.0  # the server's hint wins


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, list[tuple[int, dict[str, str]]], list[str]]]:
    """A real HTTP server answering the queued (status, headers) first, then 200 with a job."""
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            status, headers = script.pop(0) if script else (200, {})
            body = json.dumps(
                {"id": "j1", "status": "queued"} if status < 300 else {"title": "busy", "status": status}
            ).encode()
            self.send_response(status)
            for k, v in {"content-type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script, seen
    finally:
        server.shutdown()
        server.server_close()


def test_429_is_retried_honouring_retry_after_not_bad_input(flaky_server) -> None:
    base, script, seen = flaky_server
    script += [(429, {"retry-after": "2"}), (503, {"retry-after": "1"}), (502, {})]
    slept: list[float] = []
    with Client(base, retries=4, backoff=0.25, sleep=slept.append) as client:
        assert client.submit({"model": {"source": "m"}})["id"] == "j1"
    assert slept == [2.0, 1.0, 1.0]  # Retry-After, Retry-After, then backoff (third attempt: 0.25*4)
    assert len(seen) == 4


def test_429_after_every_retry_is_busy_exit_3_not_2(flaky_server) -> None:
    base, script, _ = flaky_server
    script += [(429, {"retry-after": "0"})] * 3
    code, _, err = _run("--url", base, "--retries", "3", "submit", "--model", "m")
    assert code == EXIT_UNREACHABLE, err
    assert "busy" in err and "429" in err


def test_total_timeout_keeps_retrying_past_the_attempt_count(flaky_server) -> None:
    """With --timeout, requests are retried until the deadline however many attempts that takes."""
    base, script, seen = flaky_server
    script += [(503, {"retry-after": "0"})] * 12
    code, out, err = _run("--url", base, "--retries", "1", "--timeout", "30", "submit", "--model", "m")
    assert code == 0, err
    assert out.strip() == "j1" and len(seen) == 13


def test_total_timeout_bounds_the_retries() -> None:
    import time

    t0 = time.monotonic()
    code, _, err = _run("--url", f"http://127.0.0.1:{_closed_port()}", "--timeout", "2", "status", "abc")
    assert code == EXIT_UNREACHABLE and "--timeout" in err
    assert time.monotonic() - t0 < 20  # generous: it gives up at the deadline, not after hours


# -- downloads never mix an old target with new files ---------------------------------------------


def _listing_server(files: dict[str, bytes], base: str, job_files: dict[str, bytes]) -> None:
    files.update(job_files)
    files["v1/jobs/abc"] = json.dumps({"id": "abc", "status": "succeeded"}).encode()
    listing = {"job_id": "abc", "artifacts": _artifacts(base, job_files)}
    files["v1/jobs/abc/artifacts"] = json.dumps(listing).encode()


def _sharded_job_files() -> dict[str, bytes]:
    model = {
        "model/config.json": b"{}",
        "model/model-00001-of-00002.safetensors": b"\x01" * 3000,
        "model/model-00002-of-00002.safetensors": b"\x02" * 2000,
        "model/model.safetensors.index.json": b'{"weight_map": {}}',
    }
    manifest = {"files": {n: {"size": len(d), "sha256": _sha(d)} for n, d in model.items()}}
    return {**model, "manifest.json": json.dumps(manifest).encode()}


def test_existing_target_is_refused_then_force_replaces_it_whole(file_server, tmp_path: Path) -> None:
    base, files, _ = file_server
    _listing_server(files, base, _sharded_job_files())
    target = tmp_path / "out"
    (target / "model").mkdir(parents=True)
    (target / "model" / "model.safetensors").write_bytes(b"old weights")  # an earlier job's single file
    code, _, err = _run("--url", base, "download", "abc", str(target))
    assert code == EXIT_BAD_INPUT and "--force" in err and "non-empty" in err
    assert (target / "model" / "model.safetensors").read_bytes() == b"old weights"  # untouched
    code, _, err = _run("--url", base, "download", "abc", str(target), "--force")
    assert code == 0, err
    got = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert got == sorted(_sharded_job_files())  # exactly the new job's files: the stale one is gone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copy left beside it
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)


def test_failed_verification_with_force_keeps_the_old_target(file_server, tmp_path: Path) -> None:
    base, files, _ = file_server
    _listing_server(files, base, _sharded_job_files())
    files["model/config.json"] = b"{ }"  # served bytes differ from the listing
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("previous download")
    code, _, err = _run("--url", base, "download", "abc", str(target), "--force")
    assert code == EXIT_VERIFY, err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unlisted_file_fails_manifest_check(file_server, tmp_path: Path) -> None:
    base, files, _ = file_server
    job = _job_files()
    job["model/extra.bin"] = b"not in the manifest"
    files.update(job)
    with Client(base, retries=1) as client, pytest.raises(VerificationError, match="not listed"):
        download_artifacts(client._fetch, _artifacts(base, job), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_submit_wait_download_refuses_a_stale_target_before_submitting(flaky_server, tmp_path: Path) -> None:
    base, _, seen = flaky_server
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    argv = ["submit", "--model", "m", "--wait", "--download", str(tmp_path / "out")]
    code, _, err = _run("--url", base, *argv)
    assert code == EXIT_BAD_INPUT and "--force" in err
    assert seen == []  # nothing was submitted
