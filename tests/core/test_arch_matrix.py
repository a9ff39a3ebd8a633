"""The architecture matrix: the engine's Wanda masks equal a whole-model oracle, for every family.

For each tiny model of :data:`tests.tiny_models.MATRIX` the engine's masks (Wanda 50% unstructured
and 2:4) are compared, weight by weight and expert by expert, with :mod:`tests.oracle`, which
captures nothing: block ``i``'s statistics come from whole-model forwards (blocks ``< i``
already pruned) with hooks on block ``i``'s weights. Everything the oracle does not prune
(embeddings, norms, heads, routers, biases, vision towers) must come back bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.run import engine
from core.spec import PruneSpec
from tests import oracle, tiny_models

NSAMPLES, SEQLEN, BATCH = 4, 48, 2
"""Calibration: 4 windows of 48 tokens (longer than the sliding window), 2 per forward."""

REFUSED_AT_24C91AF = frozenset(
    {
        "mixtral", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "falcon",
        "gptj", "gpt_bigcode", "olmo", "olmo2", "olmoe", "granite", "granitemoe", "stablelm", "starcoder2",
        "cohere", "cohere2", "gpt_oss", "gemma3", "llava",
    }
)  # fmt: skip
"""Families the engine at main 24c91af refuses (fixed list of nine model types)."""
WRONG_AT_24C91AF = frozenset({"qwen3"})
"""Accepted at 24c91af, but block 0's arguments are reused: block 1 (full attention) is
calibrated through block 0's sliding-window mask."""
KNOWN_FAILING: frozenset[str] = frozenset()
"""Temporarily expected to fail (strict xfail) until the issue 9 engine lands."""


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls run fastest on one thread (and do not fight the other test processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib(seed: int = 0, n: int = NSAMPLES, seqlen: int = SEQLEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, tiny_models.VOCAB, (n, seqlen), generator=g)


def families_param(names: tuple[str, ...] = tiny_models.MATRIX) -> list:
    return [
        pytest.param(
            f,
            marks=pytest.mark.xfail(
                strict=True, reason="not supported by the engine at main 24c91af (issue 9)"
            ),
        )
        if f in KNOWN_FAILING
        else f
        for f in names
    ]


def engine_prune(model: nn.Module, ids: torch.Tensor, pattern: str) -> object:
    return engine.prune(model, ids, PruneSpec(method="wanda", pattern=pattern, batch_size=BATCH))


def assert_same_as_oracle(dense: nn.Module, pruned: nn.Module, ref: oracle.OracleRun) -> None:
    """Every target's zeros equal the oracle's mask; every other tensor is untouched."""
    d_sd, p_sd, r_sd = dense.state_dict(), pruned.state_dict(), ref.model.state_dict()
    assert set(p_sd) == set(d_sd)
    problems = []
    for name, mask in ref.masks.items():
        got = p_sd[name] == 0
        want = mask | (d_sd[name] == 0)
        if not torch.equal(got, want):
            if got.dim() == 3:
                bad = [e for e in range(got.shape[0]) if not torch.equal(got[e], want[e])]
                problems.append(f"{name}: experts {bad} differ ({int((got != want).sum())} entries)")
            else:
                problems.append(f"{name}: {int((got != want).sum())} of {got.numel()} entries differ")
        elif not torch.equal(p_sd[name], r_sd[name]):
            problems.append(f"{name}: kept weights were changed")
    for name in d_sd:
        if name not in ref.masks and not torch.equal(p_sd[name], d_sd[name]):
            problems.append(f"{name}: must stay dense but was changed")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("family", families_param())
def test_wanda_masks_equal_whole_model_oracle(family: str, pattern: str) -> None:
    dense = tiny_models.build(family)
    ids = calib()
    nm = (2, 4) if pattern == "2:4" else None
    ref = oracle.wanda(dense, ids, nm, BATCH)
    assert ref.masks, "the oracle found nothing to prune"
    for name, mask in ref.masks.items():  # exactly half of every matrix
        assert int(mask.sum()) == mask.numel() // 2, name
    model = copy.deepcopy(dense)
    engine_prune(model, ids, pattern)
    assert_same_as_oracle(dense, model, ref)


MIXED = tuple(f for f in tiny_models.MATRIX if tiny_models.matrix()[f].mixed)
MOE = tuple(f for f in tiny_models.MATRIX if tiny_models.matrix()[f].kind == "moe")


def _differs(a: object, b: object) -> bool:
    """Whether two captured block arguments differ (tensors by value, containers element-wise)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) != set(b) or any(_differs(a[k], b[k]) for k in a)
    return type(a) is not type(b) or (isinstance(a, int | float | str | bool) and a != b)


@pytest.mark.parametrize("family", families_param(MIXED))
def test_each_block_is_calibrated_with_its_own_arguments(family: str) -> None:
    """Fails if block 0's arguments (sliding-window mask, local rotary) are reused for block 1."""
    dense = tiny_models.build(family)
    ids = calib()
    assert SEQLEN > tiny_models.WINDOW
    calls = oracle.block_calls(dense, ids[:BATCH])
    different = [k for k in calls[1][1] if k in calls[0][1] and _differs(calls[0][1][k], calls[1][1][k])]
    assert different, "the model passes its blocks identical arguments: this test would prove nothing"

    honest = oracle.wanda(dense, ids, None, BATCH)
    reused = oracle.wanda(dense, ids, None, BATCH, block0_kwargs=True)
    block1 = [n for n in honest.masks if ".1." in n]
    assert all(torch.equal(honest.masks[n], reused.masks[n]) for n in honest.masks if ".0." in n)
    assert any(not torch.equal(honest.masks[n], reused.masks[n]) for n in block1), (
        f"reusing block 0's {different} gives the same block-1 masks: calibration too short?"
    )
    model = copy.deepcopy(dense)
    engine_prune(model, ids, "unstructured")
    assert_same_as_oracle(dense, model, honest)


@pytest.mark.parametrize("family", MOE)
def test_oracle_expert_inputs_reproduce_the_experts_output(family: str) -> None:
    """The oracle's per-expert reconstruction (layout, gating, routing) is what the model computes."""
    model = tiny_models.build(family)
    _prefix, blocks = oracle.decoder_blocks(model)
    experts = next(m for m in blocks[0].modules() if oracle._is_fused_experts(m))
    seen: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        hidden, index = oracle.routing(args, kwargs)
        weights = (list(args) + [kwargs[k] for k in ("top_k_weights", "routing_weights") if k in kwargs])[2]
        total = torch.zeros_like(hidden)
        transposed = bool(getattr(mod, "is_transposed", False))
        for e, _x, act in oracle.expert_inputs(mod, hidden, index):
            rows = (index == e).any(-1)
            w = mod.down_proj[e]
            y = act @ w if transposed else act @ w.t()
            if getattr(mod, "down_proj_bias", None) is not None:
                y = y + mod.down_proj_bias[e]
            gate = (weights.reshape(index.shape) * (index == e)).sum(-1)[rows]
            total[rows] += y * gate[:, None]
        seen["want"], seen["got"] = total, out.reshape(total.shape)

    h = experts.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=calib()[:BATCH], use_cache=False)
    h.remove()
    torch.testing.assert_close(seen["got"], seen["want"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", families_param(MOE))
def test_each_expert_is_calibrated_on_its_routed_tokens(family: str) -> None:
    """Expert masks follow the routed tokens; statistics over all tokens would give other masks."""
    dense = tiny_models.build(family)
    ids = calib()
    routed = oracle.wanda(dense, ids, None, BATCH)
    everyone = oracle.wanda(dense, ids, None, BATCH, route_all=True)
    expert_params = [n for n in routed.masks if ".experts." in n]
    assert expert_params
    k = tiny_models.config(family).get_text_config().num_experts_per_tok
    for name in expert_params:
        counts = routed.tokens[name]
        assert sum(counts) == NSAMPLES * SEQLEN * k, (name, counts)  # each token goes to k experts
        assert all(0 < c < NSAMPLES * SEQLEN for c in counts), (name, counts)
        masks_r, masks_a = routed.masks[name], everyone.masks[name]
        assert all(not torch.equal(masks_r[e], masks_a[e]) for e in range(masks_r.shape[0])), name
    model = copy.deepcopy(dense)
    result = engine_prune(model, ids, "unstructured")
    assert_same_as_oracle(dense, model, routed)
    # The run result says how many tokens each expert saw: the oracle's routed counts.
    want = {
        n.removesuffix(".gate_up_proj"): routed.tokens[n]
        for n in expert_params
        if n.endswith(".gate_up_proj")
    }
    assert {e.module: e.tokens for e in result.experts} == want
    assert not any(e.fallback_magnitude for e in result.experts) and not result.warnings


def test_docs_core_holds_the_generated_families_table() -> None:
    from tests import families_table

    text = (tiny_models.REPO / "docs" / "core.md").read_text(encoding="utf-8")
    start, end = text.index(families_table.BEGIN), text.index(families_table.END) + len(families_table.END)
    assert text[start:end] + "\n" == families_table.markdown(), (
        "docs/core.md is stale: paste the output of `python -m tests.tiny_models --markdown`"
    )


def test_matrix_names_are_the_entries_and_cover_the_issue() -> None:
    issue = (
        "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 gemma3_text phi phi3 falcon "
        "gpt_neox gptj gpt_bigcode gpt2 opt bloom olmo olmo2 olmoe granite granitemoe stablelm starcoder2 "
        "cohere cohere2 smollm3"
    ).split()
    assert tuple(tiny_models.matrix()) == tiny_models.MATRIX
    assert set(issue) <= set(tiny_models.MATRIX)
    assert any(tiny_models.matrix()[f].kind == "multimodal" for f in tiny_models.MATRIX)
