"""Why rope_theta matters for PI at the demo's scale: the RoPE wavelengths of the demo's model, before and after PI.

For each rope_theta, reads ``inv_freq`` from transformers' own Llama rotary embedding (head_dim 32 = the demo's
hidden 128 / 4 heads) without and with PI (``rope_type="linear"``, factor 4), and prints per dimension pair the
wavelength ``2 pi / inv_freq`` in tokens, how many full rotations it makes within L and within 4L, and the angle it
turns through over the whole 4L window (a pair that turns less than 1 radian over the window is nearly blind to
position there: the same query-key match wherever the needle is). Then a summary per rope_theta (the numbers of
round 3 in EXPERIMENTS.md):

    python experiments/demo/rope_wavelengths.py
"""

from __future__ import annotations

import math

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

L, FACTOR, HIDDEN, HEADS = 128, 4, 128, 4
T = FACTOR * L


def inv_freq(theta: float, pi: bool) -> list[float]:
    rope = {"rope_type": "linear", "factor": float(FACTOR)} if pi else {"rope_type": "default"}
    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        max_position_embeddings=T if pi else L,
        rope_parameters={**rope, "rope_theta": theta},
    )
    return LlamaRotaryEmbedding(config).inv_freq.tolist()  # (head_dim / 2,)


def main() -> None:
    head_dim = HIDDEN // HEADS
    summary = []
    for theta in (500.0, 10000.0):
        before, after = inv_freq(theta, False), inv_freq(theta, True)
        print(f"rope_theta {theta:g}, head_dim {head_dim}, L = {L}, 4L = {T}")
        head = ["pair", "wavelength", "rotations in L", "rotations in 4L", "angle over 4L"]
        head += ["after PI: wavelength", "rotations in 4L", "angle over 4L"]
        print("| " + " | ".join(head) + " |")
        print("|---|---|---|---|---|---|---|---|")
        for i, (f, g) in enumerate(zip(before, after)):
            cells = [i, f"{2 * math.pi / f:.1f}", f"{L * f / (2 * math.pi):.2f}", f"{T * f / (2 * math.pi):.2f}"]
            cells += [f"{T * f:.2f}", f"{2 * math.pi / g:.1f}", f"{T * g / (2 * math.pi):.2f}", f"{T * g:.2f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
        row = {
            "theta": theta,
            "full rotation within L": sum(L * f >= 2 * math.pi for f in before),
            "full rotation within 4L": sum(T * f >= 2 * math.pi for f in before),
            "full rotation within 4L after PI": sum(T * g >= 2 * math.pi for g in after),
            "< 1 rad over 4L (position-blind), no PI": sum(T * f < 1 for f in before),
            "< 1 rad over 4L after PI": sum(T * g < 1 for g in after),
            "fastest wavelength": 2 * math.pi / max(before),
            "fastest after PI": 2 * math.pi / max(after),
            "slowest wavelength": 2 * math.pi / min(before),
            "slowest after PI": 2 * math.pi / min(after),
        }
        summary.append(row)
        print()
    print(f"Summary (head_dim {head_dim}: {head_dim // 2} pairs; L = {L}, 4L = {T}, PI factor {FACTOR})\n")
    keys = [k for k in summary[0] if k != "theta"]
    print("| | " + " | ".join(f"rope_theta {r['theta']:g}" for r in summary) + " |\n|---|---|---|")
    for k in keys:
        cells = [f"{r[k]:.1f} tokens" if isinstance(r[k], float) else str(r[k]) for r in summary]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
