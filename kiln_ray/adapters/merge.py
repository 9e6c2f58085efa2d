"""Merge LoRA adapters into one new adapter (PEFT tensors + config, ready for the store).

Every method works per module on the full deltas the adapters add to a base weight,

    ΔW_i = s_i · B_i @ A_i          # (out, in); s_i = alpha_i / r_i (alpha_i / sqrt(r_i), rsLoRA)

with a module an input lacks counting as ΔW_i = 0, and returns factors with scale 1
(lora_alpha = r):

    concat            exact: ranks are stacked, so B @ A = Σ w_i ΔW_i; r = Σ r_i
    weighted_average  ΔW = Σ w_i ΔW_i / Σ w_i, truncated to r = max r_i by SVD
    ties              TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean,
                      then truncated to r = max r_i by SVD

All arithmetic is float32; the result takes the promoted dtype of the inputs.
"""

from __future__ import annotations

import math
from functools import reduce

import torch
from torch import Tensor

from kiln_ray.adapters.store import check_adapter, lora_config, lora_pairs, lora_scale

METHODS = ("concat", "weighted_average", "ties")


def merge_adapters(
    inputs: list[tuple[dict[str, Tensor], dict, float]], method: str, density: float = 0.5
) -> tuple[dict[str, Tensor], dict]:
    """Merge (PEFT tensors, adapter_config, weight) triples with `method`; pure (inputs untouched).

    `density` (ties only) is the fraction of each delta's entries kept by magnitude.
    Raises ValueError for an unknown method, invalid adapters, different base models or
    module shapes, a zero total weight (weighted_average), density outside (0, 1], or merged
    weights that are not finite.
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {METHODS}")
    if not inputs:
        raise ValueError("merge needs at least one adapter")
    if method == "ties" and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    for tensors, config, weight in inputs:
        check_adapter(tensors, config)
        if not math.isfinite(weight):
            raise ValueError(f"merge weight must be a finite number, got {weight}")
    bases = {c.get("base_model_name_or_path") for _, c, _ in inputs} - {None}
    if len(bases) > 1:
        raise ValueError(f"adapters were trained on different base models: {sorted(bases)}")

    pairs = [lora_pairs(tensors) for tensors, _, _ in inputs]
    weights = [float(weight) for _, _, weight in inputs]
    scales = [lora_scale(config) for _, config, _ in inputs]
    ranks = [config["r"] for _, config, _ in inputs]
    shapes = _module_shapes(pairs)
    r_out = sum(ranks) if method == "concat" else max(ranks)
    if method == "weighted_average" and sum(weights) == 0.0:
        raise ValueError("weighted_average needs weights with a non-zero sum")

    merged: dict[str, Tensor] = {}
    for path, (out_features, in_features) in shapes.items():
        # Per input: A (r_i, in) and B (out, r_i) with w_i · s_i folded in; zeros if absent.
        factors = []
        for pair, weight, scale, r in zip(pairs, weights, scales, ranks):
            if path in pair:
                a, b = (t.to(torch.float32) for t in pair[path])
                factors.append((a, weight * scale * b))
            else:
                factors.append((torch.zeros(r, in_features), torch.zeros(out_features, r)))
        if method == "concat":
            a = torch.cat([a for a, _ in factors], dim=0)  # (Σ r_i, in)
            b = torch.cat([b for _, b in factors], dim=1)  # (out, Σ r_i)
        elif method == "weighted_average":
            b_stack = torch.cat([b for _, b in factors], dim=1) / sum(weights)
            b, a = _low_rank_svd(b_stack, torch.cat([a for a, _ in factors], dim=0), r_out)
        else:
            b, a = _svd(ties_delta([b @ a for a, b in factors], density), r_out)
        merged[f"{path}.lora_A.weight"] = _finite(a)
        merged[f"{path}.lora_B.weight"] = _finite(b)

    dtypes = (t.dtype for tensors, _, _ in inputs for t in tensors.values())
    dtype = reduce(torch.promote_types, dtypes)
    merged = {key: t.to(dtype).contiguous() for key, t in merged.items()}
    targets = sorted({m for _, config, _ in inputs for m in config["target_modules"]})
    config = lora_config({
        "r": r_out,
        "lora_alpha": r_out,
        "target_modules": targets,
        "base_model_name_or_path": next(iter(bases), None),
    })
    return merged, config


def ties_delta(deltas: list[Tensor], density: float) -> Tensor:
    """TIES-merge weighted deltas w_i · ΔW_i, each (out, in), into one (out, in) delta.

    1. trim: keep the ceil(density · numel) largest-magnitude entries of each delta
    2. elect: per entry, the sign of the sum of the trimmed deltas (+ on a tie at 0)
    3. disjoint mean: average, per entry, only the trimmed deltas whose sign agrees
       (entries where none agrees are 0)
    """
    stacked = torch.stack(deltas)  # (N, out, in)
    # 1. trim
    k = math.ceil(density * stacked[0].numel())
    flat = stacked.flatten(1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, flat.abs().topk(k, dim=1).indices, True)
    trimmed = (flat * keep).view_as(stacked)
    # 2. elect
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)  # (out, in)
    # 3. disjoint mean
    agrees = trimmed.sign() == elected  # zero entries never agree
    count = agrees.sum(0).clamp(min=1)
    return (trimmed * agrees).sum(0) / count


def _finite(t: Tensor) -> Tensor:
    """`t`, or ValueError if it holds inf/NaN (merge weights too large for float32, or an input
    adapter that is not finite): the SVD cannot take it, and such an adapter generates NaN."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the merged weights are not finite: merge weights too large, or an input adapter "
                         "holds inf/NaN")
    return t


def _module_shapes(pairs: list[dict[str, tuple[Tensor, Tensor]]]) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} over all inputs; every input must agree on each shape."""
    shapes: dict[str, tuple[int, int]] = {}
    for pair in pairs:
        for path, (a, b) in pair.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(path, shape) != shape:
                raise ValueError(
                    f"{path}: adapters disagree on the module shape ({shapes[path]} vs {shape}); "
                    "they are not for the same base model"
                )
    return dict(sorted(shapes.items()))


def _svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors (B (out, rank), A (rank, in)) of delta, B @ A ≈ delta."""
    u, s, vh = torch.linalg.svd(_finite(delta), full_matrices=False)
    return _truncate(u, s, vh, rank)


def _low_rank_svd(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """`_svd(b @ a, rank)` without forming b @ a: b (out, R), a (R, in) with R small.

    b = Qb Rb and aᵀ = Qa Ra (thin QR), so b @ a = Qb (Rb Raᵀ) Qaᵀ and the SVD of the small
    core Rb Raᵀ = U S Vh gives b @ a = (Qb U) S (Vh Qaᵀ).
    """
    qb, rb = torch.linalg.qr(_finite(b))  # (out, kb), (kb, R)
    qa, ra = torch.linalg.qr(_finite(a).T)  # (in, ka), (ka, R)
    u, s, vh = torch.linalg.svd(_finite(rb @ ra.T), full_matrices=False)
    return _truncate(qb @ u, s, vh @ qa.T, rank)


def _truncate(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """B = U_r S_r, A = V_rᵀ, zero-padded to `rank` when the delta has fewer singular values."""
    k = min(rank, s.numel())
    b = torch.zeros(u.shape[0], rank)
    a = torch.zeros(rank, vh.shape[1])
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    return b, a
