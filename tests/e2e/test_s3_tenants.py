"""End to end with API keys and S3 storage: real redis-server, nanio (SigV4-checking S3 server),
uvicorn API and Celery worker, all on loopback; tiny models."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from prunectl.cli import EXIT_BAD_INPUT, main
from scripts.stack import Stack
from tests import tiny_models
from tests.e2e.test_service import PROBLEM, small_request
from tests.service_fixtures import DATA_DIR, nanio_server

pytest.importorskip("boto3")
pytest.importorskip("nanio")
pytestmark = pytest.mark.e2e

ACCESS, SECRET, BUCKET = "prunee2e", "prunee2e-secret-key", "artifacts"
MODEL_BUCKET = "models"
KEYS = {"alpha": "alpha-key-0123456789abcdef", "beta": "beta-key-0123456789abcdef"}


@dataclass
class KeyedStack:
    api_url: str
    s3_url: str
    models: Path


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedStack]:
    """Redis + nanio + API + worker with PRUNE_STORAGE=s3 and two tenants (alpha, beta)."""
    import boto3

    models = tmp_path_factory.mktemp("keyed-models")
    tiny_models.save("llama", models / "small")
    with nanio_server(tmp_path_factory.mktemp("nanio-data"), ACCESS, SECRET) as s3_url:
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_url,
            aws_access_key_id=ACCESS,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        # a model published to object storage, for jobs that name it by s3:// URI
        s3.create_bucket(Bucket=MODEL_BUCKET)
        for path in (models / "small").rglob("*"):
            if path.is_file():
                key = f"approved/small/{path.relative_to(models / 'small').as_posix()}"
                s3.upload_file(str(path), MODEL_BUCKET, key)
        env = {
            "PRUNE_DATA_DIR": str(DATA_DIR),
            "PRUNE_MODEL_ROOTS": str(models),
            "PRUNE_STORAGE": "s3",
            "PRUNE_S3_BUCKET": BUCKET,
            "PRUNE_S3_ENDPOINT": s3_url,
            "PRUNE_S3_ACCESS_KEY": ACCESS,
            "PRUNE_S3_SECRET_KEY": SECRET,
            "PRUNE_S3_PREFIX": "e2e/",
            "PRUNE_S3_MODEL_PREFIXES": f"s3://{MODEL_BUCKET}/approved/",
            "PRUNE_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
            "PRUNE_DEFAULT_MAX_ACTIVE_JOBS": "3",
            "PRUNE_URL_TTL": "600",
        }
        stack = Stack(tmp_path_factory.mktemp("keyed-home"), env=env)
        try:
            stack.start_all()
            yield KeyedStack(stack.api_url, s3_url, models)
        finally:
            stack.stop()


def _client(keyed: KeyedStack, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=keyed.api_url, headers=headers, timeout=httpx.Timeout(30, read=120))


def _wait(http: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def _with_query(url: str, path: str | None = None, **changes: str) -> str:
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    q.update(changes)
    return urlunsplit((parts.scheme, parts.netloc, path or parts.path, urlencode(q), ""))


def test_missing_or_wrong_key_is_401(keyed: KeyedStack) -> None:
    with _client(keyed, None) as anon:
        for r in (
            anon.get("/v1/jobs"),
            anon.post("/v1/jobs", json=small_request(keyed.models / "small")),
            anon.get("/v1/jobs", headers={"Authorization": "Bearer not-a-key"}),
        ):
            assert r.status_code == 401, r.text
            assert r.headers["content-type"].startswith(PROBLEM)
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/healthz").status_code == 200  # ops endpoints stay open
        assert anon.get("/metrics").status_code == 200


def test_s3_job_presigned_downloads_and_tenant_isolation(keyed: KeyedStack, tmp_path: Path) -> None:
    with _client(keyed, "alpha") as alpha, _client(keyed, "beta") as beta:
        r = alpha.post("/v1/jobs", json=small_request(keyed.models / "small"))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert r.json()["tenant"] == "alpha"
        job = _wait(alpha, job_id)
        assert job["status"] == "succeeded", job

        # beta sees nothing of alpha's job: every route answers as for a missing job
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("GET", f"/v1/jobs/{job_id}/artifacts"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            assert beta.request(method, path).status_code == 404, path
        assert job_id not in {j["id"] for j in beta.get("/v1/jobs").json()["items"]}
        assert job_id in {j["id"] for j in alpha.get("/v1/jobs").json()["items"]}

        listing = alpha.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
        names = {a["name"] for a in listing}
        assert {"report.json", "manifest.json", "model/config.json"} <= names
        for a in listing:
            assert a["url"].startswith(keyed.s3_url) and "X-Amz-Signature=" in a["url"]
            assert f"/{BUCKET}/e2e/alpha/{job_id}/" in a["url"]  # per-tenant, per-job key prefix
            resp = httpx.get(a["url"], timeout=60)  # plain HTTP, no API key
            assert resp.status_code == 200, (a["name"], resp.text)
            assert len(resp.content) == a["size"]
            assert hashlib.sha256(resp.content).hexdigest() == a["sha256"]
            (tmp_path / a["name"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / a["name"]).write_bytes(resp.content)
        manifest = json.loads((tmp_path / "manifest.json").read_text())["files"]
        for rel, meta in manifest.items():
            assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == meta["sha256"], rel

        url = next(a["url"] for a in listing if a["name"] == "report.json")
        sig = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
        tampered = [
            _with_query(url, **{"X-Amz-Signature": ("0" if sig[0] != "0" else "1") + sig[1:]}),
            _with_query(url, path=urlsplit(url).path.replace("/alpha/", "/beta/")),
            _with_query(url, path=urlsplit(url).path.replace("report.json", "report.md")),
            _with_query(url, **{"X-Amz-Expires": "86400"}),
        ]
        for bad in tampered:
            assert httpx.get(bad).status_code == 403, bad
        # expired: signed with the same credentials and a 4 s lifetime. X-Amz-Date is floored to
        # the second, so the usable window is between 3 and 4 s: long enough for the first GET on a
        # loaded machine (a 1 s lifetime made this flaky), short enough to wait out.
        from jobs.storage.s3 import S3ArtifactStore

        store = S3ArtifactStore(
            BUCKET, endpoint_url=keyed.s3_url, access_key=ACCESS, secret_key=SECRET, key_prefix="e2e/"
        )
        short = store.download_url(f"alpha/{job_id}", "report.json", expires_in=4)
        assert httpx.get(short).status_code == 200
        time.sleep(5.2)
        assert httpx.get(short).status_code == 403


def test_prunectl_wrong_key_exits_2(keyed: KeyedStack) -> None:
    err = io.StringIO()
    code = main(
        ["--url", keyed.api_url, "--api-key", "wrong-key", "--retries", "1", "list"],
        out=io.StringIO(),
        err=err,
    )
    assert code == EXIT_BAD_INPUT
    assert "401" in err.getvalue() and "invalid API key" in err.getvalue()
    ok = main(["--url", keyed.api_url, "--api-key", KEYS["beta"], "list"], out=io.StringIO(), err=err)
    assert ok == 0


def test_source_outside_roots_is_422(keyed: KeyedStack, tmp_path: Path) -> None:
    outside = tmp_path / "evil"
    outside.mkdir()
    link = keyed.models / "escape"
    link.symlink_to(outside)
    with _client(keyed, "beta") as beta:
        for source in ("/etc", str(keyed.models / ".." / "x"), str(link), "org/model", "s3://b/k"):
            r = beta.post("/v1/jobs", json=small_request(source))
            assert r.status_code == 422, (source, r.text)
            body = r.json()
            assert body["errors"][0]["loc"] == ["body", "model", "source"]
            assert "model source refused" in body["detail"]


def test_model_from_s3_source(keyed: KeyedStack) -> None:
    """A job naming an allowed s3:// model: the worker copies it from the object store and prunes it;
    a URI with nothing behind it fails the job cleanly, naming the URI, with no artifacts."""
    with _client(keyed, "alpha") as alpha:
        ok = alpha.post("/v1/jobs", json=small_request(f"s3://{MODEL_BUCKET}/approved/small"))
        missing = alpha.post("/v1/jobs", json=small_request(f"s3://{MODEL_BUCKET}/approved/missing"))
        assert ok.status_code == 201 and missing.status_code == 201, (ok.text, missing.text)
        job = _wait(alpha, ok.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert job["request"]["model"]["source"] == f"s3://{MODEL_BUCKET}/approved/small"
        listing = alpha.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]
        assert {"model/config.json", "model/model.safetensors", "report.json"} <= {a["name"] for a in listing}
        report = httpx.get(next(a["url"] for a in listing if a["name"] == "report.json")).json()
        assert (
            report["spec"]["model"]["source"] == f"s3://{MODEL_BUCKET}/approved/small"
        )  # not the scratch copy

        failed = _wait(alpha, missing.json()["id"])
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "source_not_found"
        assert f"s3://{MODEL_BUCKET}/approved/missing" in failed["error"]["message"]
        assert alpha.get(f"/v1/jobs/{failed['id']}/artifacts").status_code == 409
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=keyed.s3_url,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"e2e/alpha/{failed['id']}/").get("Contents", [])
    assert left == []
