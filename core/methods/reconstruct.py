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

    def as_record(self) -> dict[str, float | int]:
        return {
            "admm_iters": self.admm_iters,
            "cg_iters": self.cg_iters,
            "support_changes": self.support_changes,
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


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1)


def pcg_refine(
    w: Tensor,
    gram: Tensor,
    keep: Tensor,
    start: Tensor | None = None,
    iters: int = 20,
    tol: float = 1e-4,
    wg: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Minimise ``tr((w - v) G (w - v)^T)`` over ``v`` supported on ``keep`` by batched CG.

    ``w``, ``gram`` in normalised coordinates (unit diagonal, so CG is Jacobi-preconditioned CG).
    Each row runs its own CG (own step sizes), all rows in one product per iteration; a row stops
    when its residual is below ``tol`` times its right-hand side ``(w G)|keep``. ``wg``: ``w @ gram``
    when the caller has it (saves one product). Returns ``(v, iterations)``; ``v`` is exactly zero
    off ``keep``.
    """
    keepf = keep.to(w.dtype)
    v = (w if start is None else start) * keepf
    if wg is None:
        wg = w @ gram
    b = wg * keepf
    b_norm = _rowdot(b, b).sqrt()
    r = b - (v @ gram) * keepf
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


def _rho_at(it: int, iters: int, rho0: float, rho_max: float, values: int) -> float:
    """Geometric schedule from ``rho0`` to ``rho_max`` in ``values`` steps of (nearly) equal length."""
    values = max(1, min(values, iters))
    stage = min(it * values // iters, values - 1)
    return rho0 * (rho_max / rho0) ** (stage / max(1, values - 1))


class _Penalty:
    """The ADMM penalty schedule (:func:`_rho_at`) and products with ``(G + rho I)^-1``.

    One Cholesky factorisation ``L L^T = G + rho I`` per value of ``rho``. A layer with fewer
    outputs than inputs (``out < in``, e.g. an MLP down projection) applies it by two triangular
    solves per product, which cost about one ``[out, in] x [in, in]`` product; a wider layer forms
    the explicit inverse once per value (``in^3``, small next to ``out * in^2``) and multiplies.
    """

    def __init__(self, gram: Tensor, iters: int, rho0: float, rho_max: float, values: int, rows: int) -> None:
        self.gram, self.iters, self.rho0, self.rho_max, self.values = gram, iters, rho0, rho_max, values
        self.solve = rows < gram.shape[0]
        self.rho: float | None = None
        self.factor: Tensor | None = None

    def at(self, it: int, u: Tensor) -> float:
        """Move to iteration ``it``'s ``rho``; rescales the scaled dual ``u`` when rho changes."""
        new = _rho_at(it, self.iters, self.rho0, self.rho_max, self.values)
        if new != self.rho or self.factor is None:
            if self.rho is not None:
                u.mul_(self.rho / new)
            a = self.gram.clone()
            torch.diagonal(a).add_(new)
            chol = torch.linalg.cholesky(a)  # positive definite after damping
            self.rho, self.factor = new, chol if self.solve else torch.cholesky_inverse(chol)
        return new

    def apply(self, b: Tensor, add: Tensor) -> Tensor:
        """``add + b (G + rho I)^-1`` (a new tensor)."""
        if not self.solve:
            return torch.addmm(add, b, self.factor)
        y = torch.linalg.solve_triangular(self.factor.mT, b, upper=True, left=False)
        return torch.linalg.solve_triangular(self.factor, y, upper=False, left=False).add_(add)


def admm_fixed(
    w: Tensor,
    gram: Tensor,
    keep: Tensor,
    start: Tensor | None = None,
    iters: int = 10,
    rho0: float = 0.1,
    rho_max: float = 10.0,
    values: int = 4,
    cg_iters: int = 10,
    tol: float = 1e-4,
) -> tuple[Tensor, SolveInfo]:
    """Fixed-mask ADMM (Boža 2024): ``V = (w G + rho (Z - U)) (G + rho I)^-1``, ``Z = (V + U)|keep``,
    ``U += V - Z``, ``rho`` stepping geometrically through ``values`` values (one Cholesky
    factorisation each); then :func:`pcg_refine` from
    ``Z``. Normalised coordinates; the result is exactly zero off ``keep``."""
    t0 = time.perf_counter()
    keepf = keep.to(w.dtype)
    wg = w @ gram
    z = (w if start is None else start) * keepf
    u = torch.zeros_like(w)
    penalty = _Penalty(gram, iters, rho0, rho_max, values, w.shape[0])
    for it in range(iters):
        rho = penalty.at(it, u)
        vu = penalty.apply(torch.add(wg, z - u, alpha=rho), u)
        z = vu * keepf
        u = vu.sub_(z)
    out, cg = pcg_refine(w, gram, keep, z, cg_iters, tol, wg)
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
    values: int = 6,
    cg_iters: int = 10,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Joint mask and weights (ALPS class), normalised coordinates. Returns ``(v, mask, info)``.

    ``D`` starts at ``w`` projected on the pattern (by ``|w|``: Wanda's score). Each iteration:
    ``V = (w G + rho (D - U)) (G + rho I)^-1``; ``D = P(V + U)`` keeping the largest ``|V + U|`` of
    each pattern group (the support update); ``U += V - D``. ``rho`` grows geometrically from
    ``rho0`` to ``rho_max`` through ``values`` values held for equal stretches of the iterations
    (one Cholesky factorisation each), which forces ``V`` onto the support as the iterations go.
    Then :func:`pcg_refine` on ``D``'s support, from ``D``.
    """
    t0 = time.perf_counter()
    wg = w @ gram
    mask = project(w.abs())
    d = w.masked_fill(mask, 0)
    u = torch.zeros_like(w)
    penalty = _Penalty(gram, iters, rho0, rho_max, values, w.shape[0])
    changes = 0
    for it in range(iters):
        rho = penalty.at(it, u)
        vu = penalty.apply(torch.add(wg, d - u, alpha=rho), u)
        new_mask = project(vu.abs())
        changes += int((new_mask != mask).sum()) // 2
        mask = new_mask
        d = vu * ~mask  # a product, not masked_fill (bench/mask_select.py)
        u = vu.sub_(d)
    out, cg = pcg_refine(w, gram, ~mask, d, cg_iters, tol, wg)
    info = SolveInfo(admm_iters=iters, cg_iters=cg, support_changes=changes, seconds=time.perf_counter() - t0)
    return out, mask, info
