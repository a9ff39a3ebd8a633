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
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".prunectl")] == []
    # same origin as the API: the key is sent
    assert all(s["auth"] == "Bearer secret-key" for s in seen)


def test_key_not_sent_to_other_origins(file_server, tmp_path: Path) -> None:
    base, files, seen = file_server
    files["a"] = b"alpha"
    with Client(f"http://127.0.0.1:{_closed_port()}", "secret-key") as client:
        download_artifacts(client._fetch, _artifacts(base, files), tmp_path)
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
