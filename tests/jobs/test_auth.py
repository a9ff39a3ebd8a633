"""API keys and tenants (jobs.auth)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.auth import AuthConfigError, KeyRing, Tenant, hash_key, main, new_key
from jobs.settings import Settings

KEY_A = "prn_alpha-key-0123456789abcdef"
KEY_B = "prn_bravo-key-0123456789abcdef"


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()


def test_from_records_and_authenticate() -> None:
    ring = KeyRing.from_records(
        [
            {"tenant": "acme", "key_sha256": hash_key(KEY_A), "max_active_jobs": 2},
            {"tenant": "acme", "key_sha256": hash_key(KEY_A + "-rotated"), "max_active_jobs": 2},
            {"tenant": "beta", "key_sha256": hash_key(KEY_B).upper()},
        ]
    )
    assert len(ring) == 3
    assert ring.authenticate(KEY_A) == Tenant("acme", 2)
    assert ring.authenticate(KEY_A + "-rotated") == Tenant("acme", 2)
    assert ring.authenticate(f"Bearer {KEY_B}") == Tenant("beta", 4)
    assert ring.authenticate(f"bearer   {KEY_B} ") == Tenant("beta", 4)
    for bad in (None, "", "Bearer ", "Bearer", KEY_A[:-1], KEY_A + "x", hash_key(KEY_A)):
        assert ring.authenticate(bad) is None
    assert set(ring.tenants) == {"acme", "beta"}


def test_from_settings_string_hashes_and_merges_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - tenant: filed\n    key_sha256: {hash_key(KEY_A)}\n    max_active_jobs: 7\n")
    ring = KeyRing.from_settings(
        Settings.from_env({"PRUNE_API_KEYS": f"ci:{KEY_B}, dev:short", "PRUNE_API_KEYS_FILE": str(f)})
    )
    assert ring.authenticate(KEY_A) == Tenant("filed", 7)
    assert ring.authenticate(KEY_B) == Tenant("ci", 4)
    assert ring.authenticate("short") == Tenant("dev", 4)
    assert KEY_B not in repr(ring._entries)  # only digests are kept
    assert len(KeyRing.from_settings(Settings())) == 0
    assert KeyRing.from_settings(Settings()).authenticate("anything") is None


def test_json_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.json"
    f.write_text(json.dumps([{"tenant": "acme", "key_sha256": hash_key(KEY_A), "max_active_jobs": 1}]))
    assert KeyRing.from_file(f).authenticate(KEY_A) == Tenant("acme", 1)


@pytest.mark.parametrize(
    "records",
    [
        [{"tenant": "Bad Name", "key_sha256": "0" * 64}],
        [{"tenant": "../x", "key_sha256": "0" * 64}],
        [{"tenant": "ok", "key_sha256": "xyz"}],
        [{"tenant": "ok"}],
        [{"tenant": "ok", "key_sha256": "0" * 64, "max_active_jobs": 0}],
        [{"tenant": "ok", "key_sha256": "0" * 64, "max_active_jobs": True}],
        [{"tenant": "ok", "key_sha256": "0" * 64, "extra": 1}],
        [{"tenant": "a", "key_sha256": "0" * 64}, {"tenant": "b", "key_sha256": "0" * 64}],
        [
            {"tenant": "a", "key_sha256": "0" * 64, "max_active_jobs": 1},
            {"tenant": "a", "key_sha256": "1" * 64, "max_active_jobs": 2},
        ],
    ],
)
def test_bad_records_refused(records: list) -> None:
    with pytest.raises(AuthConfigError):
        KeyRing.from_records(records)


def test_bad_sources_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError):
        KeyRing.from_string("nocolon")
    with pytest.raises(AuthConfigError):
        KeyRing.from_file(tmp_path / "missing.json")
    (tmp_path / "k.yaml").write_text("tenant: x\n")
    with pytest.raises(AuthConfigError):
        KeyRing.from_file(tmp_path / "k.yaml")
    (tmp_path / "k.json").write_text("{not json")
    with pytest.raises(AuthConfigError):
        KeyRing.from_file(tmp_path / "k.json")


def test_new_key_is_random_and_long() -> None:
    a, b = new_key(), new_key()
    assert a != b and len(a) >= 40


def test_cli_hash_and_new(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", KEY_A]) == 0
    assert capsys.readouterr().out.strip() == hash_key(KEY_A)
    assert main(["new", "acme", "--max-active-jobs", "3"]) == 0
    out = capsys.readouterr()
    entry = json.loads(out.out)
    key = out.err.strip().rsplit(" ", 1)[-1]
    assert KeyRing.from_records([entry]).authenticate(key) == Tenant("acme", 3)


def test_cli_module_entry_point() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "jobs.auth", "hash", "-"], input=KEY_A + "\n", capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip() == hash_key(KEY_A)
