"""The pruning-method interface shared by every entry of ``core.methods.REGISTRY``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from core.errors import InvalidInput
from core.methods.stats import LayerStats
from core.spec import PruneSpec

__all__ = ["Method", "require_hessian", "require_xnorm"]


class Method(ABC):
    """A pruning method: turns a weight and its layer statistics into a mask (True = pruned).

    ``needs`` names the statistics the engine must collect (subset of {"xnorm", "hessian"}).
    ``prune`` receives the fp32 ``[out, in]`` weight; it may update it in place (SparseGPT),
    and the caller zeroes ``weight[mask]`` afterwards in any case. ``budget`` (unstructured
    only, set by a non-uniform allocation such as OWL) is the exact number of entries to prune
    in this layer; None means ``spec.target_sparsity`` by the method's own rule.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]

    @abstractmethod
    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        """Return the boolean mask of pruned entries of ``weight``."""

    def prune_grouped(
        self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(mask, perm)``: ``perm`` is the input-column permutation over which an N:M mask is
        grouped (``mask[:, perm]`` is N:M over consecutive columns), None for consecutive groups."""
        return self.prune(weight, stats, spec, budget), None

    def prune_with_info(
        self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None
    ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """``(mask, perm, record)``: :meth:`prune_grouped` plus what the method reports for the
        layer's record (solver iterations and time for ALPS; empty by default)."""
        mask, perm = self.prune_grouped(weight, stats, spec, budget)
        return mask, perm, {}

    def __repr__(self) -> str:
        return f"<Method {self.name} needs={sorted(self.needs)}>"


def require_xnorm(stats: LayerStats, method: str) -> Tensor:
    """``stats.xnorm_sq`` or a clear error when it was not collected."""
    if stats.xnorm_sq is None:
        raise InvalidInput(f"method {method!r} needs input norms (xnorm) but none were collected")
    return stats.xnorm_sq


def require_hessian(stats: LayerStats, method: str) -> Tensor:
    """``stats.hessian`` or a clear error when it was not collected."""
    if stats.hessian is None:
        raise InvalidInput(f"method {method!r} needs the input Hessian but none was collected")
    return stats.hessian
