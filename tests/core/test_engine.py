"""Engine tests on real forward passes of tiny models of every family.

The reference masks are computed here, slowly and obviously: for block ``i`` the dense model
with blocks ``< i`` replaced by the engine's pruned weights is run end to end, forward hooks
record every linear's inputs in block ``i``, and each row's lowest Wanda scores are picked with
a Python sort (ties: lower index first).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from core.errors import Cancelled, InvalidInput, UnsupportedModel
from core.model import families
from core.progress import Progress
from core.run import engine
from core.spec import PruneSpec
from tests import tiny_models

NSAMPLES, SEQLEN = 6, 24


def calib(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tiny_models.VOCAB, (NSAMPLES, SEQLEN), generator=g)


def weight_oi(mod: nn.Module) -> torch.Tensor:
    """``[out, in]`` fp32 view of a linear or GPT-2 Conv1D weight."""
    w = mod.weight.detach().float()
    return w.t() if type(mod).__name__ == "Conv1D" else w


def block_inputs(model: nn.Module, block: int, ids: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """fp64 sum of squared inputs of every linear of ``block``, from full-model forwards."""
    fam = families.family_for(model)
    blk = families.get_blocks(model, fam)[block]
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in blk.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":

            def hook(_m, inp, _o, name=name):
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0)

            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s : s + batch], use_cache=False)
    for h in handles:
        h.remove()
    return sums


def reference_mask(w: torch.Tensor, xnorm_sq: torch.Tensor, sparsity: float, nm: tuple[int, int] | None):
    """Slow per-row Wanda mask: score |W| * ||x||, prune the lowest (stable ties)."""
    score = (w.abs() * torch.sqrt(xnorm_sq.float()).unsqueeze(0)).tolist()
    out_f, in_f = w.shape
    mask = [[False] * in_f for _ in range(out_f)]
    for r in range(out_f):
        row = score[r]
        if nm is None:
            k = math.floor(sparsity * in_f)
            for j in sorted(range(in_f), key=lambda j: (row[j], j))[:k]:
                mask[r][j] = True
        else:
            n, m = nm
            for g in range(0, in_f, m):
                for j in sorted(range(g, g + m), key=lambda j: (row[j], j))[: m - n]:
                    mask[r][j] = True
    return torch.tensor(mask)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_masks_match_slow_sequential_reference(family: str, pattern: str) -> None:
    dense = tiny_models.build(family)
    model = copy.deepcopy(dense)
    spec = PruneSpec(method="wanda", pattern=pattern, batch_size=4)
    ids = calib()
    info = engine.prune(model, ids, spec)
    fam = families.family_for(model)
    nblocks = len(families.get_blocks(model, fam))
    for i in range(nblocks):
        ref_model = copy.deepcopy(dense)
        for j in range(i):  # blocks before i carry the engine's pruned weights
            families.get_blocks(ref_model, fam)[j].load_state_dict(
                families.get_blocks(model, fam)[j].state_dict()
            )
        sums = block_inputs(ref_model, i, ids, spec.batch_size)
        blk_dense = families.get_blocks(dense, fam)[i]
        blk_pruned = families.get_blocks(model, fam)[i]
        assert sums
        for name, mod in blk_dense.named_modules():
            if name not in sums:
                continue
            w = weight_oi(mod)
            ref = reference_mask(w, sums[name], 0.5, spec.nm)
            got = weight_oi(blk_pruned.get_submodule(name)) == 0
            assert torch.equal(got, ref), f"{family} block {i} {name}"
            kept = weight_oi(blk_pruned.get_submodule(name))
            assert torch.equal(kept[~got], w[~got]), "kept weights must be untouched"
            if spec.nm is None:
                assert (got.sum(1) == w.shape[1] // 2).all()
            else:
                assert (got.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
            assert info.layers[f"{fam.blocks}.{i}.{name}"] == pytest.approx(0.5)


def test_second_block_stats_come_from_pruned_first_block() -> None:
    """Block 1's masks match stats from block 0's PRUNED outputs and differ from the dense ones."""
    dense = tiny_models.build("llama", seed=3)
    model = copy.deepcopy(dense)
    ids = calib(1)
    engine.prune(model, ids, PruneSpec(method="wanda", batch_size=3))
    fam = families.family_for(model)
    blocks_d, blocks_p = families.get_blocks(dense, fam), families.get_blocks(model, fam)

    mixed = copy.deepcopy(dense)
    families.get_blocks(mixed, fam)[0].load_state_dict(blocks_p[0].state_dict())
    from_pruned = block_inputs(mixed, 1, ids, 3)
    from_dense = block_inputs(dense, 1, ids, 3)
    differs = 0
    for name in from_pruned:
        w = weight_oi(blocks_d[1].get_submodule(name))
        got = weight_oi(blocks_p[1].get_submodule(name)) == 0
        assert torch.equal(got, reference_mask(w, from_pruned[name], 0.5, None)), name
        differs += int(not torch.equal(got, reference_mask(w, from_dense[name], 0.5, None)))
    assert differs > 0, "dense-output statistics would give the same masks; the test proves nothing"


def test_deterministic_and_batch_size_independent_counts() -> None:
    ids = calib(2)
    a, b = tiny_models.build("opt"), tiny_models.build("opt")
    ia = engine.prune(a, ids, PruneSpec(method="wanda", pattern="2:4", batch_size=2))
    ib = engine.prune(b, ids, PruneSpec(method="wanda", pattern="2:4", batch_size=2))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert ia.layers == ib.layers


def test_gpt2_conv1d_transposed() -> None:
    model = tiny_models.build("gpt2")
    lin = families.prunable_linears(model)
    assert "transformer.h.0.attn.c_attn" in lin and families.is_transposed(lin["transformer.h.0.attn.c_attn"])
    assert not any("wte" in n or "lm_head" in n for n in lin)
    engine.prune(model, calib(), PruneSpec(method="wanda", pattern="2:4"))
    w = lin["transformer.h.0.mlp.c_fc"].weight  # stored [in, out]: groups run along dim 0
    assert w.shape == (64, 256)
    assert (w.t().reshape(256, -1, 4) == 0).sum(-1).eq(2).all()


def test_ignore_patterns_and_embeddings_untouched() -> None:
    dense = tiny_models.build("llama")
    model = copy.deepcopy(dense)
    spec = PruneSpec(method="magnitude", ignore=["model.layers.0.*", "*.mlp.down_proj"])
    info = engine.prune(model, calib(), spec)
    assert all(not n.startswith("model.layers.0.") and not n.endswith("down_proj") for n in info.layers)
    assert "model.layers.0.self_attn.q_proj" in info.ignored
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight
    )
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert (model.model.layers[1].mlp.up_proj.weight == 0).float().mean() == pytest.approx(0.5)


def test_progress_and_cancel() -> None:
    events: list[Progress] = []
    engine.prune(tiny_models.build("gpt_neox"), calib(), PruneSpec(), on_progress=events.append)
    assert [(e.stage, e.block, e.nblocks) for e in events] == [("pruning", 1, 2), ("pruning", 2, 2)]
    assert events[-1].fraction == 1.0
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        engine.prune(tiny_models.build("gpt_neox"), calib(), PruneSpec(), should_cancel=lambda: next(calls))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype: torch.dtype) -> None:
    model = tiny_models.build("llama").to(dtype)
    info = engine.prune(model, calib(), PruneSpec(method="wanda", pattern="2:4", batch_size=6))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    assert set(info.layers.values()) == {0.5}
    assert info.mask_s >= 0 and info.prune_s >= info.mask_s


def test_sparsegpt_runs_with_hessian() -> None:
    model = tiny_models.build("bloom")
    info = engine.prune(model, calib(), PruneSpec(method="sparsegpt", pattern="2:4"))
    assert set(info.layers.values()) == {0.5}


def test_unsupported_architecture_and_bad_nm() -> None:
    import transformers as tf

    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    model = tf.AutoModelForCausalLM.from_config(cfg)  # BertLMHeadModel: bidirectional blocks
    with pytest.raises(UnsupportedModel, match=r"'bert'.*bidirectional"):
        engine.prune(model, calib()[:, :8] % 64, PruneSpec())
    with pytest.raises(InvalidInput, match="multiple of M=3"):
        engine.prune(tiny_models.build("llama"), calib(), PruneSpec(pattern="2:3"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_statistics_pass_stops_at_the_last_linear(family: str) -> None:
    """After the first batch, the statistics pass skips each block's last linear (its output is
    never needed); the masks still equal the slow reference (the tests above) and this counts
    the calls: per block, the last linear runs once in the first statistics batch and once per
    batch in the re-run that feeds the next block (none for the last block)."""
    model = tiny_models.build(family, seed=4)
    fam = families.family_for(model)
    blocks = families.get_blocks(model, fam)
    bs = 2
    nbatches = math.ceil(NSAMPLES / bs)
    counts: dict[int, int] = {}
    handles = []
    for i, blk in enumerate(blocks):
        last = list(families.block_linears(blk, "b").values())[-1]
        handles.append(
            last.register_forward_hook(lambda *_a, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
        )
    engine.prune(model, calib(), PruneSpec(method="wanda", batch_size=bs))
    for h in handles:
        h.remove()
    n = len(blocks)
    assert counts == {i: 1 + (nbatches if i + 1 < n else 0) for i in range(n)}
    # without the early stop it would have been 2 * nbatches per block
    assert nbatches > 1


def test_default_batch_size_depends_on_device() -> None:
    spec = PruneSpec(method="wanda")
    assert spec.batch_size is None
    assert (
        spec.batch_for(512, "cpu") == 2
        and spec.batch_for(2048, "cpu") == 1
        and spec.batch_for(64, "cpu") == 16
    )
    assert spec.batch_for(512, "cuda") == 32 and spec.batch_for(2048, "cuda") == 8
    assert PruneSpec(method="wanda", batch_size=3).batch_for(512, "cpu") == 3


NEVER = 3
"""The expert the router of :func:`_never_routed` can never choose."""


def _never_routed() -> nn.Module:
    """A tiny GPT-OSS whose routers can never choose expert :data:`NEVER` (router bias -1e4)."""
    model = tiny_models.build("gpt_oss")
    for m in model.modules():
        if hasattr(m, "top_k") and isinstance(getattr(m, "bias", None), nn.Parameter):
            with torch.no_grad():
                m.bias[NEVER] = -1e4
    return model


def test_expert_no_token_reached_is_pruned_by_magnitude_with_a_warning() -> None:
    from tests import oracle

    dense = _never_routed()
    ids = torch.randint(1, tiny_models.VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(dense)
    res = engine.prune(model, ids, PruneSpec(method="wanda", batch_size=2))
    k = dense.config.num_experts_per_tok
    assert len(res.experts) == dense.config.num_hidden_layers
    for e in res.experts:
        assert e.tokens[NEVER] == 0 and e.fallback_magnitude == [NEVER]
        assert sum(e.tokens) == ids.numel() * k and all(t > 0 for i, t in enumerate(e.tokens) if i != NEVER)
    assert len(res.warnings) == 2 * dense.config.num_hidden_layers  # gate_up_proj and down_proj
    assert all("saw no calibration token" in w and f".experts.{NEVER}." in w for w in res.warnings)

    # Expert NEVER: magnitude per matrix (floor(0.5 * numel) smallest |w|, lower flat index first);
    # the routed experts: Wanda on their own tokens, as the whole-model oracle computes.
    ref = oracle.wanda(dense, ids, None, 2)
    dense_sd, pruned_sd = dense.state_dict(), model.state_dict()
    prefix, blocks = oracle.decoder_blocks(dense)
    checked = 0
    for i, block in enumerate(blocks):
        for t in oracle.block_targets(f"{prefix}.{i}", block):
            if t.kind != "experts":
                continue
            w = t.matrices()[NEVER]
            magnitude = torch.zeros(w.numel(), dtype=torch.bool)
            magnitude[torch.argsort(w.abs().flatten(), stable=True)[: w.numel() // 2]] = True
            want = ref.masks[t.name].clone()
            want[NEVER] = t.stored([magnitude.view_as(w)])[0]
            assert torch.equal(pruned_sd[t.name] == 0, want | (dense_sd[t.name] == 0)), t.name
            checked += 1
    assert checked == 2 * len(blocks)
