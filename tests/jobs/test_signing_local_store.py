"""URL signing and the local artifact store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs.settings import Settings
from jobs.signing import Signer
from jobs.storage.base import StorageError
from jobs.storage.local import LocalArtifactStore, safe_name


def test_sign_verify_tamper_expiry() -> None:
    s = Signer(b"secret")
    exp = int(time.time()) + 60
    sig = s.sign("t", "j", "model/a.bin", exp)
    assert s.verify("t", "j", "model/a.bin", exp, sig)
    assert not s.verify("t", "j", "model/b.bin", exp, sig)
    assert not s.verify("u", "j", "model/a.bin", exp, sig)
    assert not s.verify("t", "j", "model/a.bin", exp + 1, sig)
    assert not s.verify("t", "j", "model/a.bin", exp, sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not s.verify("t", "j", "model/a.bin", exp, "ünicode")
    assert not Signer(b"other").verify("t", "j", "model/a.bin", exp, sig)
    past = int(time.time()) - 1
    assert not s.verify("t", "j", "x", past, s.sign("t", "j", "x", past))


def test_secret_generated_once_and_persisted(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    a = settings.secret()
    assert len(a) == 64 and Settings(home=tmp_path).secret() == a
    assert Settings(home=tmp_path, signing_key="k").secret() == b"k"


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "a/", "./a", "c:/x"]
)
def test_path_escapes_refused(name: str) -> None:
    with pytest.raises(ValueError):
        safe_name(name)


def test_upload_list_url_delete(tmp_path: Path) -> None:
    src = tmp_path / "out"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.bin").write_bytes(b"\x00" * 1000)
    (src / "report.json").write_text("{}")
    store = LocalArtifactStore(tmp_path / "root", Signer(b"k"), "http://api:1/")
    infos = store.upload_dir(src, "default/job1")
    assert [(i.name, i.size) for i in infos] == [("model/w.bin", 1000), ("report.json", 2)]
    assert infos[0].sha256 == hashlib.sha256(b"\x00" * 1000).hexdigest()
    assert store.list("default/job1") == infos and store.list("default/none") == []
    assert not list((tmp_path / "root" / ".tmp").iterdir())
    url = store.download_url("default/job1", "model/w.bin", 60)
    parts = urlsplit(url)
    assert parts.netloc == "api:1" and parts.path == "/v1/artifacts/default/job1/model/w.bin"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert store.signer.verify("default", "job1", "model/w.bin", int(q["expires"]), q["sig"])
    (src / "report.json").unlink()  # a re-upload replaces the whole prefix
    assert [i.name for i in store.upload_dir(src, "default/job1")] == ["model/w.bin"]
    store.delete_prefix("default/job1")
    store.delete_prefix("default/job1")
    assert store.list("default/job1") == []
    with pytest.raises(ValueError):
        store.download_url("default/job1", "../secret", 60)
    with pytest.raises(ValueError):
        store.upload_dir(src, "../escape")
    store.check()


def test_check_fails_on_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError):
        LocalArtifactStore(blocker / "root", Signer(b"k"), "http://x").check()


def test_download_dir_copies_the_indexed_files(tmp_path: Path) -> None:
    src = tmp_path / "out"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.bin").write_bytes(b"\x01" * 100)
    (src / "report.json").write_text("{}")
    store = LocalArtifactStore(tmp_path / "root", Signer(b"k"), "http://api:1/")
    infos = store.upload_dir(src, "default~sweep/job1")
    assert store.download_dir("default~sweep/job1", tmp_path / "back") == infos
    assert (tmp_path / "back" / "model" / "w.bin").read_bytes() == b"\x01" * 100
    assert not (tmp_path / "back" / ".artifacts.json").exists()  # the store's index stays behind
