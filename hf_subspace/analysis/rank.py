"""Effective rank (Roy & Vetterli 2007): how many dimensions a matrix — or a training trajectory — really uses.

``erank(A) = exp(H(p))`` with ``p_k = σ_k / Σ σ`` the singular values normalized to sum 1 and ``H`` the Shannon
entropy (``0 log 0 = 0``). ``1 ≤ erank ≤ rank`` for a nonzero matrix; it is ``n`` for an ``n x n`` multiple of the
identity, 1 for a rank-one matrix, and between for a decaying spectrum. (weightwatcher's "matrix entropy" is a
different quantity.)
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn


def erank_of_singular_values(s: torch.Tensor) -> float:
    """``exp`` of the entropy of ``s / s.sum()``; 0.0 when every value is 0."""
    s = s.detach().double().flatten().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(matrix: torch.Tensor) -> float:
    """Effective rank of a 2-D tensor (higher-dimensional ones are read as ``(shape[0], -1)``, as a conv kernel's
    output channels by everything else). Computed from float64 singular values."""
    if matrix.dim() < 2:
        raise ValueError(f"effective_rank needs a matrix (2 or more dimensions), got shape {tuple(matrix.shape)}")
    m = matrix.detach().reshape(matrix.shape[0], -1).double().cpu()
    return erank_of_singular_values(torch.linalg.svdvals(m))


def model_effective_ranks(model: nn.Module, min_size: int = 2) -> list[dict]:
    """One row per weight matrix of ``model`` (every parameter with 2+ dimensions whose sides are ≥ ``min_size``):
    ``name, shape, rank`` (numerical), ``effective_rank`` and ``ratio`` = effective rank / min(rows, cols)."""
    rows, seen = [], set()
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in seen or p.is_meta:
            continue
        seen.add(id(p))
        m = p.detach().reshape(p.shape[0], -1).double().cpu()
        if min(m.shape) < min_size:
            continue
        s = torch.linalg.svdvals(m)
        # numerical rank at the precision the weights are stored in (numpy's matrix_rank rule)
        eps = torch.finfo(p.dtype).eps if p.is_floating_point() else torch.finfo(torch.float64).eps
        tol = s.max() * max(m.shape) * eps if len(s) else 0.0
        er = erank_of_singular_values(s)
        rows.append({"name": name, "shape": list(p.shape), "rank": int((s > tol).sum()),
                     "effective_rank": er, "ratio": er / min(m.shape)})
    return rows


def trajectory_spectrum(snapshots: Sequence[dict], names: Iterable[str] | None = None,
                        center: bool = True) -> torch.Tensor:
    """Singular values of the ``k x D`` snapshot matrix (centered on its mean by default), from the ``k x k`` Gram
    matrix accumulated tensor by tensor in float64 (D can be large; k is small)."""
    if len(snapshots) < 2:
        raise ValueError(f"a trajectory needs at least 2 snapshots, got {len(snapshots)}")
    names = list(names) if names is not None else [n for n, t in snapshots[0].items() if t.is_floating_point()]
    k = len(snapshots)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for name in names:
        x = torch.stack([snap[name].detach().reshape(-1).double().cpu() for snap in snapshots])
        if center:
            x = x - x.mean(0, keepdim=True)
        gram += x @ x.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def trajectory_effective_rank(snapshots: Sequence[dict], names: Iterable[str] | None = None,
                              center: bool = True) -> float:
    """Effective rank of a training trajectory (the snapshots of one run, as TWA takes them)."""
    return erank_of_singular_values(trajectory_spectrum(snapshots, names, center))


def suggest_twa_k(snapshots: Sequence[dict], names: Iterable[str] | None = None) -> int:
    """How many trajectory directions TWA (or PCA, ``twa_num_components``) should keep: the trajectory's
    effective rank, rounded up."""
    return max(1, math.ceil(trajectory_effective_rank(snapshots, names) - 1e-6))  # 2.0000001 is 2


def suggest_dims(start: float, decades: int = 2, per_decade: int = 2) -> list[int]:
    """A log-spaced grid for an intrinsic-dimension sweep from about ``start`` (e.g. a short run's trajectory
    effective rank: training used at least that many directions) up ``decades`` powers of ten."""
    lo = 10 ** math.floor(math.log10(max(1.0, start)))
    steps = decades * per_decade
    return sorted({int(round(lo * 10 ** (i / per_decade))) for i in range(steps + 1)})


def plot_effective_ranks(rows: list[dict], path: str, title: str = "effective rank per weight matrix") -> str:
    """Each matrix's effective rank beside its full rank (min side), one horizontal bar per matrix so that every
    name stays readable however many there are; the mean ratio in the title; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.22 * len(rows) + 1.6)))
    ys = list(range(len(rows)))[::-1]  # the first matrix on top
    full = [min(r["shape"][0], math.prod(r["shape"][1:])) for r in rows]
    ax.barh(ys, full, color="#dddddd", label="full rank, min(rows, cols)")
    ax.barh(ys, [r["effective_rank"] for r in rows], color="#3b75af", label="effective rank")
    for y, r in zip(ys, rows):
        ax.text(r["effective_rank"], y, f" {r['ratio']:.0%}", va="center", fontsize=6.5)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("dimensions")
    mean = sum(r["ratio"] for r in rows) / max(1, len(rows))
    ax.set_title(f"{title}\n{len(rows)} matrices, mean effective / full rank {mean:.0%}", fontsize=9)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.9 / fig.get_figheight()), ncol=2, fontsize=7,
              frameon=False)  # above the plot, clear of every bar
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
