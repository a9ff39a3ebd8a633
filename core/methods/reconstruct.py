"""Layer-wise weight reconstruction on a sparsity pattern: pure tensor functions.

The layer-wise problem: with ``W`` the dense ``[out, in]`` weight and ``G = X X^T`` (any positive
multiple, e.g. SparseGPT's ``2/n X X^T``) the Gram of the layer's calibration inputs,

    minimise  ||(W - V) X||_F^2 = tr((W - V) G (W - V)^T)   over V, V = 0 on the pruned entries.

Rows are independent problems that share ``G``; every solver here treats all rows at once (one
``[out, in] x [in, in]`` product per iteration). ``G`` is dampened (``damp * mean(diag G)`` on the
diagonal; dead inputs, ``G_jj = 0``, get a unit diagonal), which makes the problem strictly convex:
a singular Gram (fewer tokens than inputs) has one solution, the ridge solution that stays closest
to the dense weights in the directions the calibration inputs never excite. Everything is solved in
*normalised* coordinates: ``V' = V * d``, ``G' = G / (d d^T)`` with ``d = sqrt(diag G)``, so the
Jacobi preconditioner is the identity and a plain magnitude on ``W'`` is Wanda's ``|W| ||X||``.

* :func:`pcg_refine` — conjugate gradient on the kept support, rows batched (ALPS's refinement).
* :func:`admm_fixed` — ADMM with the mask as the constraint set (Boža 2024), then ``pcg_refine``.
* :func:`alps_solve` — joint mask and weights (ALPS class): ADMM whose projection step chooses the
  support (per-row counts, an exact layer budget spread over rows, or N:M), a geometric ``rho``
  schedule, then ``pcg_refine`` on the final support.

Pruned entries are exactly zero in every result; the mask of :func:`pcg_refine` and
:func:`admm_fixed` is the one given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from core.methods.masks import nm_mask, row_budget_mask, row_mask

__all__ = [
    "Normalised",
    "SolveInfo",
    "admm_fixed",
    "alps_solve",
    "normalise",
    "objective",
    "pcg_refine",
    "support_projector",
]


@dataclass
class SolveInfo:
    """What one solve did: ADMM and CG iterations, support changes (ALPS), seconds."""

    admm_iters: int = 0
    cg_iters: int = 0
    support_changes: int = 0
    seconds: float = 0.0
    rows_kept_start: int = 0
    """ALPS's guard: rows where the starting support, refined, beat ADMM's."""

    def as_record(self) -> dict[str, float | int]:
        return {
            "admm_iters": self.admm_iters,
            "cg_iters": self.cg_iters,
            "support_changes": self.support_changes,
            "rows_kept_start": self.rows_kept_start,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class Normalised:
    """``G' = D^-1 (G + damp) D^-1`` and ``d = diag(D)``: weights map as ``W' = W * d``."""

    gram: Tensor
    d: Tensor

    def to_norm(self, w: Tensor) -> Tensor:
        return w * self.d.unsqueeze(0)

    def from_norm(self, w: Tensor) -> Tensor:
        return w / self.d.unsqueeze(0)


def normalise(gram: Tensor, damp: float, dtype: torch.dtype = torch.float32) -> Normalised:
    """Dampened, unit-diagonal Gram (see the module docstring); ``gram`` is not modified."""
    g = gram.detach().to(dtype).clone()
    diag = torch.diagonal(g)
    dead = diag <= 0
    g[dead, :] = 0
    g[:, dead] = 0
    mean = float(diag.clamp_min(0).mean())
    diag[dead] = 1.0
    diag.add_(damp * mean)
    d = diag.sqrt()
    g.div_(d.unsqueeze(0)).div_(d.unsqueeze(1))
    return Normalised(gram=g, d=d)


def objective(w: Tensor, v: Tensor, gram: Tensor) -> Tensor:
    """``tr((W - V) G (W - V)^T)`` per row, in the dtype of the inputs."""
    delta = w - v
    return ((delta @ gram) * delta).sum(dim=1)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1)


def pcg_refine(
    w: Tensor, gram: Tensor, keep: Tensor, start: Tensor | None = None, iters: int = 20, tol: float = 1e-4
) -> tuple[Tensor, int]:
    """Minimise ``tr((w - v) G (w - v)^T)`` over ``v`` supported on ``keep`` by batched CG.

    ``w``, ``gram`` in normalised coordinates (unit diagonal, so CG is Jacobi-preconditioned CG).
    Each row runs its own CG (own step sizes), all rows in one product per iteration; a row stops
    when its residual is below ``tol`` times its right-hand side ``(w G)|keep``. Returns ``(v,
    iterations)``; ``v`` is exactly zero off ``keep``.
    """
    keepf = keep.to(w.dtype)
    v = (w if start is None else start) * keepf
    b_norm = _rowdot(*(2 * [(w @ gram) * keepf])).sqrt()
    r = ((w - v) @ gram) * keepf
    p = r.clone()
    rr = _rowdot(r, r)
    tiny = torch.finfo(w.dtype).tiny
    thresh = (tol * b_norm).square()
    done = 0
    for it in range(iters):
        active = rr > thresh
        if not bool(active.any()):
            return v, it
        q = (p @ gram) * keepf
        pq = _rowdot(p, q)
        alpha = torch.where(active & (pq > tiny), rr / pq.clamp_min(tiny), torch.zeros_like(rr))
        v.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), q, value=-1)
        rr_new = _rowdot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(tiny), torch.zeros_like(rr))
        p = r + beta.unsqueeze(1) * p
        rr = rr_new
        done = it + 1
    return v, done


def _shifted_inverse(gram: Tensor, rho: float) -> Tensor:
    """``(G + rho I)^-1`` from one Cholesky factorisation (G is positive definite after damping)."""
    a = gram.clone()
    torch.diagonal(a).add_(rho)
    chol = torch.linalg.cholesky(a)
    return torch.cholesky_inverse(chol)


def _rho_at(it: int, iters: int, rho0: float, rho_max: float, every: int) -> float:
    """Geometric schedule from ``rho0`` to ``rho_max``, changed every ``every`` iterations."""
    stages = max(1, (iters - 1) // every)
    stage = min(it // every, stages)
    return rho0 * (rho_max / rho0) ** (stage / stages)


class _Penalty:
    """The ADMM penalty schedule (:func:`_rho_at`) and ``(G + rho I)^-1``, factorised once per value."""

    def __init__(self, gram: Tensor, iters: int, rho0: float, rho_max: float, every: int) -> None:
        self.gram, self.iters, self.rho0, self.rho_max, self.every = gram, iters, rho0, rho_max, every
        self.rho: float | None = None
        self.inv: Tensor | None = None

    def at(self, it: int, u: Tensor) -> tuple[float, Tensor]:
        """``(rho, inverse)`` for iteration ``it``; rescales the scaled dual ``u`` when rho changes."""
        new = _rho_at(it, self.iters, self.rho0, self.rho_max, self.every)
        if new != self.rho or self.inv is None:
            if self.rho is not None:
                u.mul_(self.rho / new)
            self.rho, self.inv = new, _shifted_inverse(self.gram, new)
        return new, self.inv


def admm_fixed(
    w: Tensor,
    gram: Tensor,
    keep: Tensor,
    start: Tensor | None = None,
    iters: int = 10,
    rho0: float = 0.1,
    rho_max: float = 10.0,
    every: int = 3,
    cg_iters: int = 10,
    tol: float = 1e-4,
) -> tuple[Tensor, SolveInfo]:
    """Fixed-mask ADMM (Boža 2024): ``V = (w G + rho (Z - U)) (G + rho I)^-1``, ``Z = (V + U)|keep``,
    ``U += V - Z``, one Cholesky factorisation per value of ``rho``; then :func:`pcg_refine` from
    ``Z``. Normalised coordinates; the result is exactly zero off ``keep``."""
    t0 = time.perf_counter()
    keepf = keep.to(w.dtype)
    wg = w @ gram
    z = (w if start is None else start) * keepf
    u = torch.zeros_like(w)
    penalty = _Penalty(gram, iters, rho0, rho_max, every)
    for it in range(iters):
        rho, inv = penalty.at(it, u)
        v = (wg + rho * (z - u)) @ inv
        z = (v + u) * keepf
        u.add_(v - z)
    out, cg = pcg_refine(w, gram, keep, z, cg_iters, tol)
    return out, SolveInfo(admm_iters=iters, cg_iters=cg, seconds=time.perf_counter() - t0)


Projector = Callable[[Tensor], Tensor]
"""Scores ``[out, in]`` -> boolean mask of pruned entries (True = pruned)."""


def support_projector(sparsity: float, nm: tuple[int, int] | None, budget: int | None) -> Projector:
    """The pattern ALPS projects onto: N:M groups, an exact layer budget spread over rows, or
    ``int(sparsity * in)`` per row (Wanda's comparison group)."""
    if nm is not None:
        return lambda s: nm_mask(s, *nm)
    if budget is not None:
        return lambda s: row_budget_mask(s, budget)
    return lambda s: row_mask(s, sparsity)


def alps_solve(
    w: Tensor,
    gram: Tensor,
    project: Projector,
    iters: int = 12,
    rho0: float = 0.1,
    rho_max: float = 10.0,
    every: int = 3,
    cg_iters: int = 10,
    tol: float = 1e-4,
    guard: bool = True,
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Joint mask and weights (ALPS class), normalised coordinates. Returns ``(v, mask, info)``.

    ``D`` starts at ``w`` projected on the pattern (by ``|w|``: Wanda's score). Each iteration:
    ``V = (w G + rho (D - U)) (G + rho I)^-1``; ``D = P(V + U)`` keeping the largest ``|V + U|`` of
    each pattern group (the support update); ``U += V - D``. ``rho`` grows geometrically from
    ``rho0`` to ``rho_max`` (one Cholesky factorisation per value), which forces ``V`` onto the
    support as the iterations go. Then :func:`pcg_refine` on ``D``'s support, from ``D``.
    ``guard``: the refinement also runs on the starting (Wanda) support, in the same products, and
    each row keeps the better of the two, so no row ends worse than Wanda's mask reconstructed with
    the same CG budget (ADMM on this non-convex set is a heuristic).
    """
    t0 = time.perf_counter()
    wg = w @ gram
    mask = start = project(w.abs())
    d = w.masked_fill(mask, 0)
    u = torch.zeros_like(w)
    penalty = _Penalty(gram, iters, rho0, rho_max, every)
    changes = 0
    for it in range(iters):
        rho, inv = penalty.at(it, u)
        vu = ((wg + rho * (d - u)) @ inv).add_(u)
        new_mask = project(vu.abs())
        changes += int((new_mask != mask).sum()) // 2
        mask = new_mask
        d = vu * (~mask).to(w.dtype)  # a product, not masked_fill (bench/mask_select.py)
        u = vu.sub_(d)
    if guard:
        both, cg = pcg_refine(
            torch.cat([w, w]),
            gram,
            ~torch.cat([mask, start]),
            torch.cat([d, w.masked_fill(start, 0)]),
            cg_iters,
            tol,
        )
        out, alt = both.chunk(2)
        worse = objective(w, out, gram) > objective(w, alt, gram)
        out = torch.where(worse.unsqueeze(1), alt, out)
        mask = torch.where(worse.unsqueeze(1), start, mask)
    else:
        out, cg = pcg_refine(w, gram, ~mask, d, cg_iters, tol)
    info = SolveInfo(admm_iters=iters, cg_iters=cg, support_changes=changes, seconds=time.perf_counter() - t0)
    info.rows_kept_start = int(worse.sum()) if guard else 0
    return out, mask, info
