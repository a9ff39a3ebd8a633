"""Compact sparse format: pack -> unpack is bit-exact; corrupt or truncated files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from core.artifacts.formats import compact
from core.cli import main
from core.errors import CorruptArtifact, InvalidInput
from tests.core.formats.conftest import DENSE_LAYER

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["0.3", "0.5", "0.9", "2:4", "4:8", "1:4"]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({n: fh.get_tensor(n) for n in fh.keys()})
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, t in a.items():
        u = b[name]
        assert u.dtype == t.dtype and u.shape == t.shape, name
        view = _INT[t.element_size()]
        assert torch.equal(t.view(view), u.view(view)), name  # bit patterns, so -0.0 != +0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pack_unpack_is_bit_exact(pruned_dir, tmp_path: Path, pattern: str, dtype: torch.dtype) -> None:
    dense = pruned_dir(pattern, dtype, shard="150KB")  # several shards
    assert len(list(dense.glob("*.safetensors"))) > 1
    header = compact.pack(dense, tmp_path / "c")
    enc = {n: e["encoding"] for n, e in header["tensors"].items()}
    assert enc["model.embed_tokens.weight"] == "dense" and "lm_head.weight" not in enc  # tied: stored once
    assert enc[f"{DENSE_LAYER}.weight"] == "dense"
    assert enc["model.norm.weight"] == "dense"
    pruned = [n for n in enc if n.endswith("proj.weight") and not n.startswith(DENSE_LAYER)]
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        assert {(header["tensors"][p]["n"], header["tensors"][p]["m"]) for p in pruned} == {(n, m)}
    elif pattern != "0.3":
        assert {enc[p] for p in pruned} == {"bitmask"}
    compact.unpack(tmp_path / "c", tmp_path / "u")
    assert_bit_identical(tensors(dense), tensors(tmp_path / "u"))
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == sorted(p.name for p in dense.iterdir())
    index = "model.safetensors.index.json"
    assert (tmp_path / "u" / index).read_bytes() == (dense / index).read_bytes()
    packed = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))
    if pattern in ("0.5", "0.9", "2:4", "1:4"):
        assert packed < sum(p.stat().st_size for p in dense.glob("*.safetensors"))


def test_signed_zero_and_natural_zero_survive(pruned_dir, tmp_path: Path) -> None:
    dense = pruned_dir("2:4")
    before = tensors(dense)
    compact.pack(dense, tmp_path / "c")
    compact.unpack(tmp_path / "c", tmp_path / "u")
    after = tensors(tmp_path / "u")
    name = "model.layers.1.mlp.up_proj.weight"
    neg = torch.signbit(before[name]) & (before[name] == 0)
    assert int(neg.sum()) >= 1 and torch.equal(torch.signbit(after[name]) & (after[name] == 0), neg)


def test_load_model_gives_the_dense_models_outputs(pruned_dir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dense = pruned_dir("0.5", torch.bfloat16)
    compact.pack(dense, tmp_path / "c")
    ref = AutoModelForCausalLM.from_pretrained(dense).eval()
    model = compact.load_model(tmp_path / "c")
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_compact_int8_keeps_the_mask(pruned_dir, tmp_path: Path) -> None:
    dense = pruned_dir("2:4")
    before = tensors(dense)
    quant = {n for n in before if n.endswith("proj.weight")}
    header = compact.pack(dense, tmp_path / "ci", quantize=quant)
    assert header["quantized"] and all(header["tensors"][n]["quant"] for n in quant)
    compact.unpack(tmp_path / "ci", tmp_path / "u")
    after = tensors(tmp_path / "u")
    for n, t in before.items():
        if n in quant:
            assert torch.equal(after[n] == 0, t == 0), n
            step = t.abs().amax(1, keepdim=True) / 127
            assert ((after[n] - t).abs() <= step * 1.01).all(), n
        else:
            assert torch.equal(after[n], t), n
    int8_bytes = sum(p.stat().st_size for p in (tmp_path / "ci").glob("*.safetensors"))
    compact.pack(dense, tmp_path / "c")
    assert int8_bytes < sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))


@pytest.fixture
def packed(pruned_dir, tmp_path: Path) -> Path:
    compact.pack(pruned_dir("2:4"), tmp_path / "c")
    return tmp_path / "c"


def _shard(d: Path) -> Path:
    return sorted(d.glob("compact-*.safetensors"))[0]


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage",
    [
        "flip_data",
        "truncate_shard",
        "truncate_header",
        "edit_shape",
        "drop_shard",
        "version",
        "flip_tokenizer",
    ],
)
def test_corrupt_or_truncated_is_refused(packed: Path, tmp_path: Path, damage: str) -> None:
    shard = _shard(packed)
    head = packed / compact.HEADER
    if damage == "flip_data":
        _flip(shard, shard.stat().st_size - 3)
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "truncate_header":
        head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
    elif damage == "edit_shape":
        h = json.loads(head.read_text())
        h["tensors"]["model.layers.1.mlp.up_proj.weight"]["shape"][0] -= 1
        head.write_text(json.dumps(h))
    elif damage == "drop_shard":
        shard.unlink()
    elif damage == "version":
        h = json.loads(head.read_text())
        h["version"] = 99
        head.write_text(json.dumps(h))
    elif damage == "flip_tokenizer":
        _flip(packed / "tokenizer.json", 10)
    with pytest.raises(CorruptArtifact) as exc:
        compact.unpack(packed, tmp_path / "u")
    assert isinstance(exc.value, InvalidInput) and str(exc.value)
    with pytest.raises(CorruptArtifact):
        compact.load_model(packed)


def test_decoding_checks_even_a_consistent_header(packed: Path, tmp_path: Path) -> None:
    """A header rewritten with valid checksums but wrong counts still cannot produce a model."""
    head = packed / compact.HEADER
    h = json.loads(head.read_text())
    h["tensors"]["model.layers.1.mlp.up_proj.weight"]["n"] = 1
    h["header_sha256"] = compact._header_digest(h)
    head.write_text(json.dumps(h))
    with pytest.raises(CorruptArtifact, match="cannot be decoded"):
        compact.unpack(packed, tmp_path / "u")


def test_cli_unpack(packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unpack", str(packed), str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] > 0
    assert (tmp_path / "out" / "config.json").is_file()
    _flip(_shard(packed), 200)
    assert main(["unpack", str(packed), str(tmp_path / "out2")]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    assert main(["unpack", str(tmp_path), str(tmp_path / "out3")]) == 2
    assert "not a compact directory" in capsys.readouterr().err
