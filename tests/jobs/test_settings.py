"""Service settings: every variable parses as before, bad values are refused by name, the README's
configuration table is the generator's output and lists every variable the code reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.settings import ConfigError, EngineSettings, env_name
from jobs.settings import HOUR, Settings
from prunectl.settings import ClientSettings
from scripts import config_table

REPO = Path(__file__).resolve().parents[2]

# variable -> [(raw value, field, parsed value), ...]; every service variable needs an entry
PARSES: dict[str, list[tuple[str, str, Any]]] = {
    "REDIS_URL": [("redis://r:1/2", "redis_url", "redis://r:1/2")],
    "PRUNE_HOME": [("some/dir", "home", Path("some/dir").resolve()), ("/srv/var", "home", Path("/srv/var"))],
    "PRUNE_DATA_DIR": [("/data", "data_dir", Path("/data")), ("d", "data_dir", Path("d").resolve())],
    "PRUNE_PUBLIC_URL": [("https://p.example.com/", "public_url", "https://p.example.com")],
    "PRUNE_SIGNING_KEY": [("k", "signing_key", "k"), ("", "signing_key", None)],
    "PRUNE_QUEUE": [("gpu.a100", "queue", "gpu.a100")],
    "PRUNE_JOB_TIME_LIMIT": [("60", "job_time_limit", 60)],
    "PRUNE_MAX_ATTEMPTS": [("5", "max_attempts", 5), ("", "max_attempts", 3)],
    "PRUNE_URL_TTL": [("600", "url_ttl", 600)],
    "PRUNE_MAX_BODY": [("2048", "max_body", 2048)],
    "PRUNE_VISIBILITY_TIMEOUT": [("90", "visibility_timeout_s", 90), ("0", "visibility_timeout_s", None)],
    "PRUNE_LEASE_RENEW": [("1", "lease_renew_s", 1.0)],
    "PRUNE_LEASE_EXPIRE": [("6.5", "lease_expire_s", 6.5)],
    "PRUNE_OUTBOX_INTERVAL": [("0.5", "outbox_interval", 0.5), ("0", "outbox_interval", 0.0)],
    "PRUNE_OUTBOX_AGE": [("3", "outbox_age", 3.0)],
    "PRUNE_RETENTION_DAYS": [("0.5", "retention_days", 0.5), ("0", "retention_days", 0.0)],
    "PRUNE_RETENTION_INTERVAL": [("0", "retention_interval", 0.0)],
    "PRUNE_WORK_SWEEP_INTERVAL": [("0.5", "work_sweep_interval", 0.5), ("0", "work_sweep_interval", 0.0)],
    "PRUNE_SWEEP_FANOUT": [("0", "sweep_fanout", False), ("on", "sweep_fanout", True)],
    "PRUNE_STORAGE_RETRIES": [("0", "storage_retries", 0)],
    "PRUNE_STORAGE_BACKOFF": [("0.2", "storage_backoff", 0.2)],
    "PRUNE_STORAGE": [(" Local ", "storage", "local")],
    "PRUNE_S3_BUCKET": [("b", "s3_bucket", "b")],
    "PRUNE_S3_ENDPOINT": [("http://m:9000", "s3_endpoint", "http://m:9000"), ("", "s3_endpoint", None)],
    "PRUNE_S3_PUBLIC_ENDPOINT": [("http://h:9000", "s3_public_endpoint", "http://h:9000")],
    "PRUNE_S3_REGION": [("eu-west-1", "s3_region", "eu-west-1"), ("", "s3_region", "us-east-1")],
    "PRUNE_S3_ACCESS_KEY": [("a", "s3_access_key", "a")],
    "PRUNE_S3_SECRET_KEY": [("s", "s3_secret_key", "s")],
    "PRUNE_S3_PREFIX": [("prod/", "s3_prefix", "prod/"), ("", "s3_prefix", "")],
    "PRUNE_S3_MULTIPART_THRESHOLD_MB": [("8", "s3_multipart_threshold_mb", 8)],
    "PRUNE_API_KEYS_FILE": [("/run/keys.yaml", "api_keys_file", Path("/run/keys.yaml"))],
    "PRUNE_API_KEYS": [("ci:k", "api_keys", "ci:k"), ("", "api_keys", None)],
    "PRUNE_DEFAULT_MAX_ACTIVE_JOBS": [("2", "default_max_active_jobs", 2)],
    "PRUNE_MODEL_ROOTS": [
        (os.pathsep.join(["/a", " /b ", ""]), "model_roots", (Path("/a"), Path("/b"))),
        ("", "model_roots", ()),  # empty: no local paths (unset: the defaults)
    ],
    "PRUNE_ALLOW_HUB": [("TRUE", "allow_hub", True), ("yes", "allow_hub", True), ("0", "allow_hub", False)],
    "PRUNE_HUB_ALLOWLIST": [("a/*, b/c ,", "hub_allowlist", ("a/*", "b/c"))],
    "PRUNE_S3_MODEL_PREFIXES": [("s3://m/a/,s3://m/b/", "s3_model_prefixes", ("s3://m/a/", "s3://m/b/"))],
    "PRUNE_S3_SOURCE_ENDPOINT": [("http://m:9000", "s3_source_endpoint", "http://m:9000")],
    "PRUNE_S3_SOURCE_REGION": [("r", "s3_source_region", "r")],
    "PRUNE_S3_SOURCE_ACCESS_KEY": [("a", "s3_source_access_key", "a")],
    "PRUNE_S3_SOURCE_SECRET_KEY": [("s", "s3_source_secret_key", "s")],
    "PRUNE_MAX_SOURCE_GB": [("2", "max_source_gb", 2.0)],
    "PRUNE_WEBHOOK_SECRET": [("whsec_x", "webhook_secret", "whsec_x")],  # checked where it is used
    "PRUNE_WEBHOOK_ALLOW_PRIVATE": [
        ("1", "webhook_allow_private", True),
        ("no", "webhook_allow_private", False),
    ],
    "PRUNE_LOG_LEVEL": [("debug", "log_level", "DEBUG"), ("", "log_level", "INFO")],
    "PRUNE_WORKER_ID": [("w1", "worker_id", "w1"), ("", "worker_id", None)],
}

REFUSED = [
    ("PRUNE_MAX_ATTEMPTS", "three"),
    ("PRUNE_MAX_ATTEMPTS", "0"),
    ("PRUNE_JOB_TIME_LIMIT", "1.5"),
    ("PRUNE_URL_TTL", "-1"),
    ("PRUNE_MAX_BODY", "1MB"),
    ("PRUNE_VISIBILITY_TIMEOUT", "-5"),
    ("PRUNE_LEASE_RENEW", "0"),
    ("PRUNE_LEASE_EXPIRE", "inf"),
    ("PRUNE_OUTBOX_INTERVAL", "-1"),
    ("PRUNE_OUTBOX_AGE", "soon"),
    ("PRUNE_RETENTION_DAYS", "-1"),
    ("PRUNE_RETENTION_DAYS", "nan"),
    ("PRUNE_RETENTION_INTERVAL", "hourly"),
    ("PRUNE_WORK_SWEEP_INTERVAL", "-1"),
    ("PRUNE_STORAGE_RETRIES", "-1"),
    ("PRUNE_STORAGE_BACKOFF", "nan"),
    ("PRUNE_STORAGE", "gcs"),
    ("PRUNE_S3_MULTIPART_THRESHOLD_MB", "0"),
    ("PRUNE_DEFAULT_MAX_ACTIVE_JOBS", "0"),
    ("PRUNE_ALLOW_HUB", "maybe"),
    ("PRUNE_S3_MODEL_PREFIXES", "s3://ok/,http://bucket/x"),
    ("PRUNE_MAX_SOURCE_GB", "0"),
    ("PRUNE_WEBHOOK_ALLOW_PRIVATE", "2"),
    ("PRUNE_SWEEP_FANOUT", "sometimes"),
    ("PRUNE_LOG_LEVEL", "loud"),
]


def service_variables() -> list[str]:
    return [n for f in Settings.model_fields.values() if (n := env_name(f))]


def test_every_variable_has_a_parse_case_and_a_description() -> None:
    assert sorted(PARSES) == sorted(service_variables())
    for cls in (Settings, EngineSettings, ClientSettings):
        for name, field in cls.model_fields.items():
            if env_name(field):
                assert field.description and field.description.strip(), (cls.__name__, name)


@pytest.mark.parametrize("var", sorted(PARSES))
def test_each_variable_parses(var: str) -> None:
    for raw, attr, want in PARSES[var]:
        got = getattr(Settings.from_env({var: raw}), attr)
        assert got == want, (var, raw, got)


def test_unset_variables_take_the_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.redis_url, s.home, s.data_dir, s.public_url) == (
        "redis://localhost:6379/0",
        Path("var").resolve(),
        None,
        "http://localhost:8000",
    )
    assert (s.queue, s.job_time_limit, s.max_attempts, s.url_ttl, s.max_body) == (
        "prune.gpu",
        6 * HOUR,
        3,
        HOUR,
        258 * 1024,  # jobs.bounds.max_body(): the largest bounded request plus whitespace
    )
    assert s.visibility_timeout == 7 * HOUR and s.retention_s == 30 * 24 * HOUR
    assert (s.storage, s.s3_region, s.s3_prefix, s.max_source_gb) == ("local", "us-east-1", "", 500.0)
    assert s.model_roots is None and s.hub_allowlist == () and not s.allow_hub
    assert s.default_max_active_jobs is None and s.worker_id is None and s.log_level == "INFO"
    # blank values mean unset, except where a blank has its own meaning
    blank = Settings.from_env({v: "" for v in service_variables()})
    assert blank.model_dump() == {**s.model_dump(), "retention_days": 0.0, "model_roots": ()}
    assert blank.retention_s is None  # empty retention: kept forever


@pytest.mark.parametrize(("var", "raw"), REFUSED)
def test_bad_values_are_refused_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(var)) as info:
        Settings.from_env({var: raw})
    assert str(info.value).startswith("invalid configuration: ")
    assert isinstance(info.value, ValueError)


def test_errors_name_every_bad_variable_and_hide_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PRUNE_MAX_ATTEMPTS": "x", "PRUNE_URL_TTL": "y"})
    assert "PRUNE_MAX_ATTEMPTS='x'" in str(info.value) and "PRUNE_URL_TTL='y'" in str(info.value)
    with pytest.raises(ConfigError, match="PRUNE_S3_BUCKET is required with PRUNE_STORAGE=s3"):
        Settings.from_env({"PRUNE_STORAGE": "S3"})
    assert Settings.from_env({"PRUNE_STORAGE": "S3", "PRUNE_S3_BUCKET": "b"}).storage == "s3"
    secret = "super-secret-signing-key"
    assert secret not in repr(Settings(signing_key=secret, s3_secret_key=secret, api_keys=secret))


def test_constructor_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNE_QUEUE", "from-env")
    monkeypatch.setenv("PRUNE_MAX_ATTEMPTS", "not a number")
    assert Settings(home=Path("rel")).queue == "prune.gpu"
    assert Settings(home=Path("rel")).home == Path("rel").resolve()
    with pytest.raises(ConfigError, match="PRUNE_MAX_ATTEMPTS"):
        Settings.from_env()
    monkeypatch.setenv("PRUNE_MAX_ATTEMPTS", "4")
    assert (Settings.from_env().queue, Settings.from_env().max_attempts) == ("from-env", 4)


def test_engine_settings() -> None:
    e = EngineSettings.from_env({})
    assert e == EngineSettings() and e.hessian_limit_bytes == 16 * 2**30 and not e.hf_hub_offline
    assert e.baseline_cache_dir() is None and e.data_dir is None
    assert EngineSettings.from_env({"PRUNE_HOME": "/h"}).baseline_cache_dir() == Path("/h/cache/baselines")
    for off in ("", "off", "0", "FALSE"):
        env = {"PRUNE_HOME": "/h", "PRUNE_BASELINE_CACHE": off}
        assert EngineSettings.from_env(env).baseline_cache_dir() is None, off
    assert EngineSettings.from_env({"PRUNE_BASELINE_CACHE": "/c"}).baseline_cache_dir() == Path("/c")
    assert e.model_cache_dir() is None and e.model_cache_bytes == 20 * 10**9
    assert EngineSettings.from_env({"PRUNE_HOME": "/h"}).model_cache_dir() == Path("/h/cache/models")
    for off in ({"PRUNE_MODEL_CACHE": "off"}, {"PRUNE_MODEL_CACHE": ""}, {"PRUNE_MODEL_CACHE_BYTES": "0"}):
        assert EngineSettings.from_env({"PRUNE_HOME": "/h", **off}).model_cache_dir() is None, off
    assert EngineSettings.from_env({"PRUNE_MODEL_CACHE": "/m"}).model_cache_dir() == Path("/m")
    assert EngineSettings.from_env({"PRUNE_MODEL_CACHE_BYTES": "1000"}).model_cache_bytes == 1000
    for bad in ("20G", "-1"):
        with pytest.raises(ConfigError, match="PRUNE_MODEL_CACHE_BYTES"):
            EngineSettings.from_env({"PRUNE_MODEL_CACHE_BYTES": bad})
    assert EngineSettings.from_env({"PRUNE_DATA_DIR": "/d"}).data_dir == Path("/d")
    assert EngineSettings.from_env({"PRUNE_HESSIAN_LIMIT_BYTES": "1024"}).hessian_limit_bytes == 1024
    for raw, offline in (("1", True), (" On", True), ("yes", True), ("0", False), ("whatever", False)):
        assert EngineSettings.from_env({"HF_HUB_OFFLINE": raw}).hf_hub_offline is offline, raw
    for bad in ("16G", "0"):
        with pytest.raises(ConfigError, match="PRUNE_HESSIAN_LIMIT_BYTES"):
            EngineSettings.from_env({"PRUNE_HESSIAN_LIMIT_BYTES": bad})


def test_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNE_URL", raising=False)
    monkeypatch.setenv("PRUNE_API_KEY", "")
    assert (ClientSettings().url, ClientSettings().api_key) == ("http://localhost:8000", None)
    monkeypatch.setenv("PRUNE_URL", "https://prune.example.com")
    monkeypatch.setenv("PRUNE_API_KEY", "prn_k")
    assert (ClientSettings().url, ClientSettings().api_key) == ("https://prune.example.com", "prn_k")


# -- the configuration table -----------------------------------------------------------------------


@pytest.mark.parametrize("doc", config_table.DOCS)
def test_config_tables_are_generated_from_the_classes(doc: str) -> None:
    text = (REPO / doc).read_text()
    assert "<!-- config-table:start" in text
    assert config_table.render(text) == text, f"{doc} is stale: run python scripts/config_table.py"


def test_generator_rewrites_a_stale_section() -> None:
    stale = "intro\n<!-- config-table:start PRUNE_QUEUE -->\n| old |\n<!-- config-table:end -->\nrest\n"
    new = config_table.render(stale)
    assert "| old |" not in new and new.startswith("intro\n") and new.endswith("rest\n")
    assert "| `PRUNE_QUEUE` | `prune.gpu` | Celery queue the GPU workers consume. |" in new
    assert config_table.render(new) == new
    with pytest.raises(ValueError, match="PRUNE_NOPE"):
        config_table.section(["PRUNE_NOPE"])


def _readme_variables() -> set[str]:
    text = (REPO / "README.md").read_text()
    body = text[text.index("<!-- config-table:start -->") : text.index("<!-- config-table:end -->")]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", body, re.M))


def test_readme_table_lists_every_variable_the_code_reads() -> None:
    listed = _readme_variables()
    for cls in (Settings, EngineSettings, ClientSettings):
        assert {env_name(f) for f in cls.model_fields.values()} - {None} <= listed, cls.__name__
    named: dict[str, set[str]] = {}
    for top in ("api", "jobs", "worker", "core"):
        for path in sorted((REPO / top).rglob("*.py")):
            text = path.read_text()
            for name in re.findall(r"\b(PRUNE_[A-Z0-9_]+|REDIS_URL)\b", text):
                named.setdefault(name, set()).add(str(path.relative_to(REPO)))
            # the fault tests' hooks (tests/faults/, PRUNE_FAULT_PLAN) stay out of production code
            assert not re.search(r"^\s*(from|import) tests\b", text, re.M), path
    assert "PRUNE_HOME" in named and "REDIS_URL" in named  # the grep itself works
    assert "PRUNE_FAULT_PLAN" not in named and "PRUNE_FAULT_PLAN" not in listed
    missing = {
        name: files
        for name, files in named.items()
        if not (any(v.startswith(name) for v in listed) if name.endswith("_") else name in listed)
    }
    assert not missing, f"variables named in the code but missing from the README table: {missing}"


# -- startup with a refused value ------------------------------------------------------------------


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("program", "cmd"),
    [
        ("prune api", [sys.executable, "-m", "uvicorn", "api.app:app", "--port", "1"]),
        ("prune worker", [sys.executable, "-m", "celery", "-A", "worker.app", "worker"]),
        ("stack", [sys.executable, "scripts/stack.py", "serve"]),
    ],
)
def test_startup_refuses_a_bad_value_with_one_line(program: str, cmd: list[str], tmp_path: Path) -> None:
    out = _start(cmd, {"PRUNE_HOME": str(tmp_path), "PRUNE_LEASE_EXPIRE": "soon"})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"{program}: invalid configuration: PRUNE_LEASE_EXPIRE='soon': Input should be a valid number, "
        "unable to parse string as a number"
    )
    assert not (tmp_path / "logs").exists()  # the launcher started nothing


def test_api_startup_names_a_bad_webhook_secret_or_key(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "uvicorn", "api.app:app", "--port", "1"]
    for env, line in (
        ({"PRUNE_WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "PRUNE_WEBHOOK_SECRET: webhook secret must hold"),
        ({"PRUNE_API_KEYS": "no-colon"}, "PRUNE_API_KEYS entries must look like 'tenant:key'"),
    ):
        out = _start(cmd, {"PRUNE_HOME": str(tmp_path), "PRUNE_SIGNING_KEY": "k", **env})
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert line in out.stderr.strip().splitlines()[-1]
