"""The host cache of dequantized GGUF models (core/model/model_cache.py) on real tiny GGUF files."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from core.model import model_cache
from core.model.loading import Loaded, load_model
from core.run import pipeline, resume
from core.spec import ModelSpec, PruneSpec, RunSpec
from tests import tiny_models


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A directory holding tiny llama GGUF files: ``a.gguf`` (Q8_0 matrices), ``b.gguf`` and ``c.gguf``
    (other seeds)."""
    d = tmp_path_factory.mktemp("gguf")
    for seed, name in enumerate(("a", "b", "c")):
        tiny_models.save_gguf(d / f"{name}.gguf", seed=seed)
    return d


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "home" / "cache" / "models"
    monkeypatch.delenv("PRUNE_MODEL_CACHE", raising=False)
    monkeypatch.delenv("PRUNE_MODEL_CACHE_BYTES", raising=False)
    monkeypatch.setenv("PRUNE_HOME", str(tmp_path / "home"))
    return root


def load(path: Path, dtype: str = "float32") -> Loaded:
    return load_model(ModelSpec(source=str(path), dtype=dtype))


def assert_identical(a: Loaded, b: Loaded) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ids = torch.arange(1, 33).view(1, -1)
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    text = "The cat sat on the mat, and = = Valkyria = = 1999."
    assert a.tokenizer(text).input_ids == b.tokenizer(text).input_ids
    assert type(a.model) is type(b.model)
    # the same config, so an attempt that hits continues the block checkpoints of one that missed
    assert a.model.config.to_json_string(use_diff=False) == b.model.config.to_json_string(use_diff=False)
    assert resume.fingerprint(a.model, ids, PruneSpec()) == resume.fingerprint(b.model, ids, PruneSpec())


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_hit_is_bit_identical_to_the_dequantizing_load(
    gguf_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRUNE_MODEL_CACHE", "off")
    plain = load(gguf_dir / "a.gguf")
    assert plain.gguf_cache == "off"
    monkeypatch.delenv("PRUNE_MODEL_CACHE")
    miss = load(gguf_dir / "a.gguf")
    hit = load(gguf_dir / "a.gguf")
    assert (miss.gguf_cache, hit.gguf_cache) == ("miss", "hit")
    assert_identical(plain, miss)
    assert_identical(plain, hit)
    assert hit.source == plain.source == str(gguf_dir / "a.gguf") and hit.gguf
    # the entry is a plain Hugging Face directory with its marker, without the GGUF quantizer
    (key,) = entries(cache)
    entry = cache / key
    assert key == model_cache.key(gguf_dir / "a.gguf", "float32")
    marker = json.loads((entry / model_cache.MARKER).read_text())
    assert marker["key"] == key and marker["version"] == model_cache.VERSION and marker["bytes"] > 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entry.iterdir()}
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert getattr(hit.model, "hf_quantizer", None) is None
    assert getattr(hit.model.config, "quantization_config", None) is None
    # another dtype is another entry, bit-identical to its own dequantizing load
    bf = load(gguf_dir / "a.gguf", "bfloat16")
    assert bf.gguf_cache == "miss" and len(entries(cache)) == 2
    bf_hit = load(gguf_dir / "a.gguf", "bfloat16")
    assert bf_hit.gguf_cache == "hit" and next(bf_hit.model.parameters()).dtype == torch.bfloat16
    assert_identical(bf, bf_hit)


def test_a_hit_reads_nothing_from_the_gguf_file(
    gguf_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.model import loading

    src = gguf_dir / "a.gguf"
    reference = load(src)
    assert reference.gguf_cache == "miss"
    loading._checked_gguf.clear()  # as in a new process (a resumed attempt's pool child)
    loading._gguf_configs.clear()

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the GGUF file was parsed")

    monkeypatch.setattr(loading, "_parse_gguf", refused)
    monkeypatch.setattr(loading, "_read_config", refused)
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def tokenizer(cls, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert "gguf_file" not in kwargs, "the GGUF tokenizer was parsed"
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(tokenizer))
    hit = load(src)
    assert hit.gguf_cache == "hit"
    assert_identical(reference, hit)


def test_key_follows_content_dtype_and_versions(
    gguf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.gguf"
    shutil.copyfile(gguf_dir / "a.gguf", path)
    k = model_cache.key(path, "float32")
    assert model_cache.key(gguf_dir / "a.gguf", "float32") == k  # content, not path
    assert model_cache.key(path, "bfloat16") != k
    # new content at the same path (same size: one byte of tensor data flipped) is a new key
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert path.stat().st_size == st.st_size
    assert model_cache.key(path, "float32") != k
    import transformers

    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    assert model_cache.key(gguf_dir / "a.gguf", "float32") != k


def test_torn_or_foreign_entry_is_ignored_and_rebuilt(gguf_dir: Path, cache: Path) -> None:
    src = gguf_dir / "a.gguf"
    reference = load(src)
    key = model_cache.key(src, "float32")
    entry = cache / key
    # a torn entry: the files of a complete one, but no marker (a crash before the marker was written)
    (entry / model_cache.MARKER).unlink()
    assert model_cache.lookup(src, "float32").status == "miss"
    again = load(src)
    assert again.gguf_cache == "miss" and (entry / model_cache.MARKER).is_file()
    assert load(src).gguf_cache == "hit"
    # a marker naming another key, and a half-written entry, are never read either
    marker = json.loads((entry / model_cache.MARKER).read_text())
    (entry / model_cache.MARKER).write_text(json.dumps({**marker, "key": "0" * 64}))
    assert model_cache.lookup(src, "float32").status == "miss"
    shutil.rmtree(entry)
    entry.mkdir()
    (entry / "config.json").write_text("{")
    assert load(src).gguf_cache == "miss"
    hit = load(src)
    assert hit.gguf_cache == "hit"
    assert_identical(reference, hit)


def test_entry_that_fails_to_load_falls_back_and_is_dropped(
    gguf_dir: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = gguf_dir / "a.gguf"
    reference = load(src)
    entry = cache / model_cache.key(src, "float32")
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # marker intact, weights truncated
    with caplog.at_level(logging.WARNING, logger="core.model.model_cache"):
        fallback = load(src)
    assert fallback.gguf_cache == "error" and "failed to load" in caplog.text
    assert_identical(reference, fallback)
    assert not entry.exists()
    assert load(src).gguf_cache == "miss" and load(src).gguf_cache == "hit"


def test_lru_eviction_under_a_small_budget(
    gguf_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = (gguf_dir / f"{n}.gguf" for n in "abc")
    ka, kb, kc = (model_cache.key(p, "float32") for p in (a, b, c))
    assert load(a).gguf_cache == "miss"
    size = json.loads((cache / ka / model_cache.MARKER).read_text())["bytes"]
    assert size == sum(f.stat().st_size for f in (cache / ka).iterdir() if f.name != model_cache.MARKER)
    monkeypatch.setenv("PRUNE_MODEL_CACHE_BYTES", str(int(size * 2.5)))  # room for two entries
    assert load(b).gguf_cache == "miss" and entries(cache) == sorted([ka, kb])
    os.utime(cache / ka / model_cache.MARKER, (1, 1))
    os.utime(cache / kb / model_cache.MARKER, (2, 2))
    assert load(a).gguf_cache == "hit"  # a is now the most recently used: b is evicted next
    assert load(c).gguf_cache == "miss"
    assert entries(cache) == sorted([ka, kc])
    assert load(b).gguf_cache == "miss" and entries(cache) == sorted([kb, kc])
    # a crashed writer's old temporary directory goes on the next eviction; a fresh one stays
    stale, fresh = cache / f".{ka}.tmp-dead", cache / f".{ka}.tmp-live"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    os.utime(stale, (1, 1))
    assert model_cache.evict(cache, int(size * 2.5)) == []
    assert not stale.exists() and fresh.exists()
    # a model larger than the whole budget is loaded but not cached
    monkeypatch.setenv("PRUNE_MODEL_CACHE_BYTES", str(size // 2))
    shutil.rmtree(cache)
    assert load(a).gguf_cache == "miss" and entries(cache) == []


def test_unwritable_cache_or_full_disk_still_loads(
    gguf_dir: Path,
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = gguf_dir / "a.gguf"
    monkeypatch.setenv("PRUNE_MODEL_CACHE", "off")
    reference = load(src)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PRUNE_MODEL_CACHE", str(blocker / "models"))  # mkdir fails (also as root)
    with caplog.at_level(logging.WARNING, logger="core.model.model_cache"):
        got = load(src)
    assert got.gguf_cache == "error" and "cannot store" in caplog.text
    assert_identical(reference, got)
    # a full disk while writing: the half-written entry is removed, the job goes on
    monkeypatch.delenv("PRUNE_MODEL_CACHE")
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.model.model_cache"):
        got = load(src)
    assert got.gguf_cache == "error" and "No space left" in caplog.text
    assert_identical(reference, got)
    assert list(cache.iterdir()) == []  # no entry, no temporary directory
    monkeypatch.undo()


def test_disabled_by_setting(
    gguf_dir: Path, tiny_model_dir, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = gguf_dir / "a.gguf"
    monkeypatch.setenv("PRUNE_MODEL_CACHE_BYTES", "0")
    assert model_cache.cache_dir() is None and load(src).gguf_cache == "off"
    monkeypatch.delenv("PRUNE_MODEL_CACHE_BYTES")
    for off in ("off", "0", "false", ""):
        monkeypatch.setenv("PRUNE_MODEL_CACHE", off)
        assert model_cache.cache_dir() is None, off
    assert load(src).gguf_cache == "off"
    monkeypatch.delenv("PRUNE_MODEL_CACHE")
    monkeypatch.delenv("PRUNE_HOME")
    assert model_cache.cache_dir() is None and load(src).gguf_cache == "off"
    assert not cache.exists()
    monkeypatch.setenv("PRUNE_HOME", str(cache.parent.parent))
    assert load_model(ModelSpec(source=str(tiny_model_dir("llama")))).gguf_cache is None  # not a GGUF


def test_run_report_records_the_cache(gguf_dir: Path, data_dir: Path, tmp_path: Path, cache: Path) -> None:
    spec = RunSpec.model_validate(
        {
            "model": {"source": str(gguf_dir / "a.gguf")},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": "wikitext2", "nsamples": 2, "seqlen": 32},
            "evaluation": {"max_windows": 1, "dense_baseline": False},
            "outputs": {"model": False},
        }
    )
    first = pipeline.run(spec, tmp_path / "o1", data_dir=data_dir)
    second = pipeline.run(spec, tmp_path / "o2", data_dir=data_dir)
    assert (first.model.gguf_cache, second.model.gguf_cache) == ("miss", "hit")
    assert first.model.gguf and second.model.source == first.model.source
    assert second.evaluation.pruned_ppl == first.evaluation.pruned_ppl
    assert json.loads((tmp_path / "o2" / "report.json").read_text())["model"]["gguf_cache"] == "hit"


def test_an_attempt_that_hits_resumes_the_one_that_missed(
    gguf_dir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.errors import Cancelled
    from core.run import engine
    from tests.core.test_resume import calib, cancel_at_block

    src, spec = gguf_dir / "a.gguf", PruneSpec(method="wanda", pattern="2:4", batch_size=2)
    monkeypatch.setenv("PRUNE_MODEL_CACHE", "off")
    clean = load(src)
    ref = engine.prune(clean.model, calib(), spec)
    monkeypatch.delenv("PRUNE_MODEL_CACHE")
    first = load(src)
    assert first.gguf_cache == "miss"
    with pytest.raises(Cancelled):
        engine.prune(first.model, calib(), spec, should_cancel=cancel_at_block(1), resume_dir=tmp_path / "r")
    again = load(src)  # the next attempt, after a worker restart
    assert again.gguf_cache == "hit"
    res = engine.prune(again.model, calib(), spec, resume_dir=tmp_path / "r")
    assert res.resumed_from_block == 1 and res.layers == ref.layers
    sa, sb = again.model.state_dict(), clean.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
