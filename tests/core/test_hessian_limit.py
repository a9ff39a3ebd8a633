"""The SparseGPT Hessian limit is read when used (PRUNE_HESSIAN_LIMIT_BYTES), not once at import."""

from __future__ import annotations

import pytest

from core.run import engine


def test_the_limit_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNE_HESSIAN_LIMIT_BYTES", "1024")
    assert engine.hessian_limit_bytes() == 1024 and engine.HESSIAN_LIMIT_BYTES == 1024
    monkeypatch.setenv("PRUNE_HESSIAN_LIMIT_BYTES", "2048")
    assert engine.hessian_limit_bytes() == 2048 and engine.HESSIAN_LIMIT_BYTES == 2048
    monkeypatch.delenv("PRUNE_HESSIAN_LIMIT_BYTES")
    assert engine.hessian_limit_bytes() == 16 * 2**30
    with pytest.raises(AttributeError):
        engine.NO_SUCH_NAME  # noqa: B018
