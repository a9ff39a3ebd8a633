"""Source policy (jobs.sources): hub ids, S3 prefixes, local roots with symlinks and '..'."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.spec import RunSpec
from jobs.settings import Settings
from jobs.sources import ResolvedSource, SourcePolicy, SourceRefused, allowed_roots_hint


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "models"
    (root / "llama" / "sub").mkdir(parents=True)
    (root / "llama" / "config.json").write_text("{}")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd").write_text("x")
    os.symlink(outside, root / "evil-dir")
    os.symlink(outside / "passwd", root / "evil-file")
    os.symlink(root / "llama", root / "alias")  # symlink staying inside is fine
    sibling = tmp_path / "models-other"  # shares the string prefix of the root
    sibling.mkdir()
    return {"root": root, "outside": outside, "sibling": sibling}


def _policy(root: Path, **kw) -> SourcePolicy:
    base = {"allow_hub": True, "hub_allowlist": None, "s3_prefixes": ["s3://models/approved/"]}
    base.update(kw)
    return SourcePolicy(model_roots=[root], **base)


def test_local_paths_inside_root(roots: dict[str, Path]) -> None:
    p = _policy(roots["root"])
    real_root = os.path.realpath(roots["root"])
    assert p.check(str(roots["root"] / "llama")) == ResolvedSource("local", f"{real_root}/llama")
    assert p.check(f"{roots['root']}/llama/sub/../config.json").location == f"{real_root}/llama/config.json"
    assert p.check(str(roots["root"] / "alias")).location == f"{real_root}/llama"
    assert p.check(f"file://{roots['root']}/llama").kind == "local"
    # nonexistent paths under the root pass the policy (the loader reports them)
    assert p.check(str(roots["root"] / "missing")).kind == "local"


@pytest.mark.parametrize(
    "path",
    [
        "{root}/../secret/passwd",
        "{root}/llama/../../secret",
        "{root}/evil-dir",
        "{root}/evil-dir/passwd",
        "{root}/evil-file",
        "{sibling}",
        "/etc/passwd",
        "file:///etc/passwd",
        "~/models",
        "file:relative/path",
    ],
)
def test_local_escapes_refused(roots: dict[str, Path], path: str) -> None:
    p = _policy(roots["root"])
    with pytest.raises(SourceRefused):
        p.check(path.format(root=roots["root"], sibling=roots["sibling"]))


def test_local_disabled_without_roots() -> None:
    with pytest.raises(SourceRefused, match="disabled"):
        SourcePolicy().check("/models/x")


def test_hub_ids() -> None:
    p = SourcePolicy(allow_hub=True)
    assert p.check("meta-llama/Llama-3.1-8B") == ResolvedSource("hub", "meta-llama/Llama-3.1-8B")
    assert p.check("facebook/opt-125m").kind == "hub"
    bad_ids = ("gpt2", "a/b/c", "org/../x", "-org/name", "org/name-", "org/na me", "org/", "a--b/c")
    for bad in bad_ids:
        with pytest.raises(SourceRefused):
            p.check(bad)
    with pytest.raises(SourceRefused, match="disabled"):
        SourcePolicy(allow_hub=False).check("facebook/opt-125m")


def test_hub_allowlist() -> None:
    p = SourcePolicy(allow_hub=True, hub_allowlist=["meta-llama/*", "Qwen/Qwen2.5-*"])
    assert p.check("meta-llama/Llama-3.1-8B").kind == "hub"
    assert p.check("qwen/Qwen2.5-0.5B").kind == "hub"  # hub ids are case-insensitive
    for refused in ("Qwen/Qwen3-8B", "evil/meta-llama", "meta-llamax/foo"):
        with pytest.raises(SourceRefused, match="allow list"):
            p.check(refused)


def test_s3_prefixes() -> None:
    p = SourcePolicy(s3_prefixes=["s3://models/approved/", "s3://team-bucket"])
    assert p.check("s3://models/approved/llama/") == ResolvedSource("s3", "s3://models/approved/llama/")
    assert p.check("s3://team-bucket/anything/x.gguf").kind == "s3"
    for bad in (
        "s3://models/approvedx/llama",
        "s3://models/other/llama",
        "s3://models/approved/../other",
        "s3://models/approved/./x",
        "s3://models/approved//x",
        "s3://team-bucket-2/x",
        "s3://Bad_Bucket/x",
        "s3://models",
    ):
        with pytest.raises(SourceRefused):
            p.check(bad)
    with pytest.raises(SourceRefused, match="disabled"):
        SourcePolicy().check("s3://models/approved/llama")
    with pytest.raises(ValueError):
        SourcePolicy(s3_prefixes=["models/approved"])


def test_garbage_refused() -> None:
    p = SourcePolicy(allow_hub=True)
    for bad in ("", "   ", "org/name\n", "x" * 2000, "relative/../path/x", "C:\\models"):
        with pytest.raises(SourceRefused):
            p.check(bad)


def test_datasets_and_spec(roots: dict[str, Path]) -> None:
    p = _policy(roots["root"])
    assert p.check_dataset("wikitext2") == ResolvedSource("dataset", "wikitext2")
    assert p.check_dataset(str(roots["root"] / "llama" / "config.json")).kind == "local"
    with pytest.raises(SourceRefused):
        p.check_dataset("/etc/passwd")
    with pytest.raises(SourceRefused):
        p.check_dataset("some/dataset")
    spec = RunSpec.model_validate({"model": {"source": "facebook/opt-125m"}, "calibration": {"source": "c4"}})
    assert set(p.check_spec(spec)) == {"model", "calibration", "evaluation"}
    bad = RunSpec.model_validate(
        {"model": {"source": "facebook/opt-125m"}, "evaluation": {"source": "/etc/shadow"}}
    )
    with pytest.raises(SourceRefused):
        p.check_spec(bad)
    bad_gguf = RunSpec.model_validate(
        {"model": {"source": str(roots["root"] / "llama"), "gguf_file": "../../x.gguf"}}
    )
    with pytest.raises(SourceRefused, match="gguf_file"):
        p.check_spec(bad_gguf)


def test_from_settings(tmp_path: Path) -> None:
    env = {
        "PRUNE_ALLOW_HUB": "true",
        "PRUNE_HUB_ALLOWLIST": "meta-llama/*, facebook/opt-*",
        "PRUNE_S3_MODEL_PREFIXES": "s3://models/a/,s3://models/b/",
        "PRUNE_MODEL_ROOTS": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]),
    }
    p = SourcePolicy.from_settings(Settings.from_env(env))
    assert p.allow_hub and p.hub_allowlist == ["meta-llama/*", "facebook/opt-*"]
    assert p.s3_prefixes == ["s3://models/a/", "s3://models/b/"]
    assert p.model_roots == [tmp_path / "a", tmp_path / "b"]
    assert p.check(str(tmp_path / "b" / "m")).kind == "local"
    assert allowed_roots_hint(p)
    default = SourcePolicy.from_settings(Settings())
    assert not default.allow_hub and default.hub_allowlist is None and default.model_roots == []
