"""The bitsandbytes CPU trap: a 4-bit weight repacked for an inference kernel gets wrong LoRA gradients."""

from __future__ import annotations

import sys

from torch import nn


def fix_bnb_cpu_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes `Linear4bit` of `model` on its training-safe kernel on CPU.

    bitsandbytes 0.50 on CPUs with avx512_bf16 repacks a 4-bit weight for a fast inference kernel the first time the
    layer runs in eval mode on an input without grad (any `torch.no_grad()` evaluation). That kernel has no autograd
    path, so later training steps compute LoRA gradients that are silently wrong (relative error ~1) while the loss
    looks normal. This sets `support_avx512bf16_for_cpu = False` on every `Linear4bit` and unpacks weights that were
    already repacked (best effort: the repack rounded their absmax to bf16, so call this before any evaluation).
    Every PI/MLA adapter calls it when it is injected (`get_peft_model`, `PeftModel.from_pretrained`, `add_adapter`,
    `load_adapter`), so a pi_peft model is safe from its first forward. Harmless on GPU and on models without 4-bit
    layers; it never imports bitsandbytes itself (a model with 4-bit layers has imported it already).

    Returns:
        `int`: the number of `Linear4bit` modules fixed.
    """
    bnb = sys.modules.get("bitsandbytes")  # no 4-bit layer can exist before bitsandbytes is imported
    if bnb is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            count += 1
    return count
