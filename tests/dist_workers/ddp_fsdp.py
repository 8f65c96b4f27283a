"""Worker of tests/test_distributed.py: one training step of a tiny Llama + PI adapter, in 1 or 2 processes.

    python tests/dist_workers/ddp_fsdp.py train <pi-peft train options>      # DDP: pi_peft.training.sft.main itself
    python tests/dist_workers/ddp_fsdp.py fsdp2 MODEL BATCH OUT [--qlora]      # torch FSDP2 `fully_shard`, by hand
    python tests/dist_workers/ddp_fsdp.py rope-mismatch MODEL                  # PI on rank 0 only -> refused

Run under `torchrun --nproc_per_node 2` (or as one plain process for the reference) by
:func:`dist_workers.common.launch`; every rank writes its loss, its LoRA / trainable gradients (taken just before
the optimizer step), the engine it ran and the inputs it saw with :func:`dist_workers.common.write_result`.

The trainable weights are set to the same seeded random values in every run before the step (LoRA B is zero after
peft's init, which would leave the A gradients zero and the comparison weak).
"""

from __future__ import annotations

import os
import sys

import torch

from dist_workers.common import write_result

LOGIT_IDS = torch.arange(3, 131).remainder(250).add(3).unsqueeze(0)  # (1, 128) fixed tokens for the output check


def set_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Every LoRA weight of `model` <- seeded N(0, 0.05^2), by sorted name: the same in every process and run."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            g = torch.Generator().manual_seed(seed + i)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)


def strip(name: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP `module.`, FSDP), so runs compare by name."""
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{name: full gradient}` of every trainable parameter (FSDP2 DTensor gradients gathered: collective)."""
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        assert g is not None, f"{name} has no gradient"
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[strip(name)] = g.detach().clone()
    return grads


def rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(argv: list[str]) -> None:
    """DDP (or one process) through `pi_peft.training.sft.main`, the code of `pi-peft train`."""
    from transformers import TrainerCallback

    from pi_peft.cli.train import parse_train_args
    from pi_peft.training.sft import main

    seen: dict = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            set_trainable(model)

            def hook(module, args_, kwargs_):
                ids = kwargs_.get("input_ids")
                if ids is not None and module.training:
                    seen.setdefault("rows", []).extend(ids.tolist())

            seen["hook"] = model.register_forward_pre_hook(hook, with_kwargs=True)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if "grads" not in seen:
                seen["grads"] = grads_of(model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "loss" not in seen:
                seen["loss"] = logs["loss"]

    trainer = main(*parse_train_args(argv), callbacks=[Capture()])
    seen.pop("hook").remove()
    accelerator = trainer.accelerator
    rank, world = rank_world()
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=LOGIT_IDS, use_cache=False).logits[0]
    write_result(
        {
            "rank": rank,
            "world_size": world,
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "wrapped": type(trainer.model_wrapped).__name__,
            "loss": seen["loss"],
            "rows": seen["rows"],
            "rope_factor": trainer.model.config.rope_parameters.get("factor"),
        },
        tensors={"grads": seen["grads"], "logits": {"logits": logits}},
    )


def qlora_config():
    """NF4 4-bit with fp32 compute and fp32 storage (FSDP-QLoRA: the storage dtype is the compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.float32,
    )


def load_pi_model(model_path: str, qlora: bool):
    """The tiny Llama in fp32 (4-bit NF4 with fp32 storage and compute for `qlora`) + a PI adapter (LoRA on all
    linear layers, LongLoRA's trainable embeddings and norms), trainable weights set by :func:`set_trainable`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_peft.ops.bnb import fix_bnb_cpu_repack
    from pi_peft.tuners.pi.config import PIConfig

    kwargs = {"quantization_config": qlora_config(), "device_map": {"": "cpu"}} if qlora else {}
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **kwargs)
    fix_bnb_cpu_repack(base)
    config = PIConfig(
        context_length=128,
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
        train_embeddings=True,  # LongLoRA, as `pi-peft train`
        train_norms=True,
    )
    model = get_peft_model(base, config)
    set_trainable(model)
    return model


def fsdp2(model_path: str, batch_path: str, out_dir: str, qlora: bool) -> None:
    """One step with torch FSDP2 (`fully_shard` on every decoder layer and the root): each rank runs its rows of the
    global batch, FSDP2 averages the gradients; the adapter is saved from a full state dict on rank 0."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from pi_peft.training.distributed import check_rope_across_ranks

    rank, world = rank_world()
    if world > 1:
        dist.init_process_group("gloo")
    model = load_pi_model(model_path, qlora)
    bnb = sys.modules.get("bitsandbytes")
    model.train()
    rows = load_file(batch_path)["input_ids"]
    assert rows.shape[0] % world == 0, f"{rows.shape[0]} rows do not split over {world} ranks"
    mine = rows.chunk(world)[rank]
    sharded = False
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        check_rope_across_ranks(model)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    loss = model(input_ids=mine, labels=mine, use_cache=False).loss
    loss.backward()
    grads = grads_of(model)
    global_loss = loss.detach().clone()
    if world > 1:
        dist.all_reduce(global_loss)
        global_loss /= world
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=LOGIT_IDS, use_cache=False).logits[0]
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        model.save_pretrained(out_dir, state_dict=state)
    if world > 1:
        dist.barrier()
    placements = sorted({str(getattr(p, "placements", "-")) for p in model.parameters()})
    write_result(
        {
            "rank": rank,
            "world_size": world,
            "sharded": sharded,
            "placements": placements,
            "local_rows": mine.tolist(),
            "loss": global_loss.item(),
            "rope_factor": model.config.rope_parameters.get("factor"),
            "4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) if bnb else 0,
        },
        tensors={"grads": grads, "logits": {"logits": logits}},
    )
    if world > 1:
        dist.destroy_process_group()


def rope_mismatch(model_path: str) -> None:
    """Rank 0 applies the PI adapter, rank 1 keeps the base RoPE: :func:`check_rope_across_ranks` must refuse on
    every rank (it all-gathers, so no rank hangs)."""
    import torch.distributed as dist
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_peft.training.distributed import check_rope_across_ranks
    from pi_peft.tuners.pi.config import PIConfig

    rank, world = rank_world()
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if rank == 0:
        model = get_peft_model(model, PIConfig(context_length=128, r=4, target_modules=["q_proj"]))
        model = model.base_model.model  # same buffer names as the plain model on rank 1
    try:
        check_rope_across_ranks(model)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    write_result({"rank": rank, "world_size": world, "error": error})
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "train":
        train(rest)
    elif mode == "fsdp2":
        fsdp2(rest[0], rest[1], rest[2], qlora="--qlora" in rest[3:])
    elif mode == "rope-mismatch":
        rope_mismatch(rest[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}: train, fsdp2 or rope-mismatch")
