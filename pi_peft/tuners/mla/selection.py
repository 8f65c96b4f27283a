"""Partial RoPE: which rotary frequency pairs keep their rotation (MHA2MLA, Ji et al. 2025, Sec. 3.1).

transformers' RoPE layout pairs dimension ``i`` with ``i + head_dim / 2`` (``rotate_half``); pair ``i`` turns at
``inv_freq[i] = theta ** (-2 i / head_dim)``, so low indices are the *high* frequencies. A selection keeps
``rope_dims / 2`` pairs per key/value head; the other ``head_dim - rope_dims`` dimensions lose RoPE and become the
"no-RoPE" part whose keys are compressed into the latent. The math is small pure functions on index tensors:

    high     pairs 0 .. p-1                               (fastest rotations)
    low      pairs P-p .. P-1                             (slowest rotations)
    uniform  pairs 0, s, 2s, ... with stride s = P // p   (spread over the spectrum)
    2-norm   top-p pairs by  sum_{h in group} E|q_h,i| * E|k_i|   on calibration data (per layer and kv head)

with ``P = head_dim / 2`` and ``p = rope_dims / 2``. Every function returns *sorted* pair indices ``(kv_heads, p)``.
"""

from __future__ import annotations

import torch

ROPE_SELECTIONS: tuple[str, ...] = ("2-norm", "high", "low", "uniform")
"""The partial-RoPE strategies of MHA2MLA; ``2-norm`` needs calibration data (see `initialize_mla_weights`)."""


def fixed_pairs(selection: str, head_dim: int, rope_dims: int, kv_heads: int) -> torch.Tensor:
    """Kept pair indices of a data-free selection (``high``/``low``/``uniform``): ``(kv_heads, rope_dims / 2)``."""
    n_pairs, keep = head_dim // 2, rope_dims // 2
    if selection == "high":
        pairs = torch.arange(keep)
    elif selection == "low":
        pairs = torch.arange(n_pairs - keep, n_pairs)
    elif selection == "uniform":
        pairs = torch.arange(keep) * (n_pairs // keep)
    else:
        raise ValueError(
            f"`rope_selection`={selection!r} is not a data-free selection; use 'high', 'low' or 'uniform'."
        )
    return pairs.unsqueeze(0).expand(kv_heads, keep).clone()


def pair_norms(states: torch.Tensor) -> torch.Tensor:
    """2-norm of every rotary pair: ``(..., d) -> (..., d / 2)``; pair ``i`` is dims ``(i, i + d/2)``."""
    half = states.shape[-1] // 2
    return torch.sqrt(states[..., :half].float() ** 2 + states[..., half:].float() ** 2)


def two_norm_scores(q_norms: torch.Tensor, k_norms: torch.Tensor) -> torch.Tensor:
    """Score of each pair of each kv head: mean query-pair norm x mean key-pair norm, summed over the GQA group.

    ``q_norms (heads, P)``, ``k_norms (kv_heads, P)`` (token means of `pair_norms`) ``-> (kv_heads, P)``.
    """
    kv_heads = k_norms.shape[0]
    group = q_norms.shape[0] // kv_heads
    q_grouped = q_norms.view(kv_heads, group, -1)  # (kv_heads, group, P); query head h belongs to kv head h // group
    return (q_grouped * k_norms[:, None, :]).sum(dim=1)


def top_pairs(scores: torch.Tensor, rope_dims: int) -> torch.Tensor:
    """The ``rope_dims / 2`` highest-scoring pairs per kv head, sorted: ``(kv_heads, P) -> (kv_heads, r/2)``."""
    keep = rope_dims // 2
    return torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values


def pair_dims(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head dims of the kept pairs, half-split layout: ``(kv_heads, p) -> (kv_heads, 2p)`` = ``[P.., P + d/2..]``.

    `rotate_half` on the gathered ``2p`` dims then pairs exactly the dims transformers pairs in the full head.
    """
    return torch.cat([pairs, pairs + head_dim // 2], dim=-1)


def nope_dims(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head dimensions that lose RoPE (the complement of `pair_dims`), ascending: ``(kv_heads, hd - 2p)``."""
    kept = pair_dims(pairs, head_dim)
    mask = torch.ones(pairs.shape[0], head_dim, dtype=torch.bool)
    mask.scatter_(1, kept, False)
    return torch.stack([torch.nonzero(row).flatten() for row in mask])
