"""`GET /v1/jobs/{id}/artifacts` reads the index recorded at upload, not the files (issue 13, item 4:
it re-hashed every file on every call, 1-2 s for a 538 MB model)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fastapi.testclient import TestClient

from jobs.spec import JobStatus
from jobs.storage.base import INDEX_NAME
from jobs.store import now
from tests.api.test_api import submit

MIB = 1024 * 1024
BIG = 48 * MIB


def bytes_read() -> int:
    """Bytes this process has read through read(2)-like calls so far (/proc/self/io `rchar`)."""
    text = Path("/proc/self/io").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


def _job_output(root: Path) -> dict[str, str]:
    """A job's output directory as the pipeline writes it (a large weights file, a manifest)."""
    files = {"model/model.safetensors": os.urandom(MIB) * (BIG // MIB), "model/config.json": b"{}"}
    files["report.json"] = b'{"ok": true}'
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    manifest = {n: {"size": len(files[n]), "sha256": digests[n]} for n in files}
    (root / "manifest.json").write_text(json.dumps({"files": manifest}))
    digests["manifest.json"] = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    return digests


def test_listing_comes_from_the_upload_index_without_reading_the_files(
    client: TestClient, tmp_path: Path
) -> None:
    svc = client.app.state.services
    job_id = submit(client).json()["id"]
    svc.store.transition(job_id, [JobStatus.queued], JobStatus.running, attempts=1, started_at=now())
    digests = _job_output(tmp_path / "out")
    svc.artifacts.upload_dir(tmp_path / "out", f"default/{job_id}")
    svc.store.transition(job_id, [JobStatus.running], JobStatus.succeeded)
    stored = svc.artifacts.path(f"default/{job_id}", "model/model.safetensors")
    assert stored.stat().st_size == BIG

    for _ in range(3):  # every call is cheap, not only the first
        before = bytes_read()
        r = client.get(f"/v1/jobs/{job_id}/artifacts")
        read = bytes_read() - before
        assert r.status_code == 200, r.text
        assert read < MIB, f"the listing read {read} bytes (the artifacts are {BIG} bytes)"
    listing = {a["name"]: a for a in r.json()["artifacts"]}
    assert sorted(listing) == sorted(digests)  # the index itself is not an artifact
    assert INDEX_NAME not in listing
    for name, digest in digests.items():
        assert listing[name]["sha256"] == digest
        assert listing[name]["size"] == svc.artifacts.path(f"default/{job_id}", name).stat().st_size
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]
    for name, entry in manifest.items():  # consistent with what the pipeline recorded
        assert (listing[name]["size"], listing[name]["sha256"]) == (entry["size"], entry["sha256"])
    assert client.get(listing["model/config.json"]["url"]).content == b"{}"


def test_a_directory_stored_without_an_index_is_still_listed(client: TestClient, tmp_path: Path) -> None:
    """Jobs uploaded before the index existed: their files are hashed (the old behaviour)."""
    svc = client.app.state.services
    src = tmp_path / "src"
    src.mkdir()
    (src / "report.md").write_text("# old")
    prefix = "default/" + "b" * 20
    svc.artifacts.upload_dir(src, prefix)
    svc.artifacts.path(prefix, INDEX_NAME).unlink()
    [info] = svc.artifacts.list(prefix)
    assert (info.name, info.size, info.sha256) == ("report.md", 5, hashlib.sha256(b"# old").hexdigest())
