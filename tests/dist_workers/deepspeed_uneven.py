"""Launched by `dist_workers.common.launch` (torchrun, 2 processes): a tiny PI model with the tiled MLP under
DeepSpeed ZeRO-3 (direct `deepspeed.initialize`, CPU accelerator, gloo), where the two ranks get rows of different
lengths (100 and 40 tokens: 7 and 3 tiles of 16), so the tiled MLP must agree on one tile count (7) or ZeRO-3's
parameter all-gathers would not match. Each rank writes its row, the tile counts, the full trainable values and
gradients (`dist_workers.common.write_result`) for tests/test_distributed_deepspeed.py."""

import math
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

LENGTHS = (100, 40)
TILE = 16


def main() -> None:
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from peft import get_peft_model

    import pi_peft.ops.tiled_mlp as tiled_mlp
    from dist_workers.common import write_result
    from pi_peft import PIConfig
    from pi_peft.testing import tiny_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see deepspeed_train.py
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    agreed: list[int] = []
    agreed_tile_count = tiled_mlp.agreed_tile_count

    def recorded(*args, **kwargs):
        agreed.append(agreed_tile_count(*args, **kwargs))
        return agreed[-1]

    tiled_mlp.agreed_tile_count = recorded

    config = PIConfig(context_length=256, r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(tiny_model(), config).train()
    tiled_mlp.apply_tiled_mlp(model, TILE)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(0, 128, (1, LENGTHS[rank]), generator=torch.Generator().manual_seed(rank))
    loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    partitioned = all(p.numel() == 0 and hasattr(p, "ds_id") for _, p in trainable)
    grads = {n: safe_get_full_grad(p) for n, p in trainable}
    with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
        params = {n: p.detach().clone() for n, p in trainable}
    write_result(
        {"loss": loss.item(), "local_tiles": math.ceil(LENGTHS[rank] / TILE), "agreed_tiles": agreed,
         "partitioned": partitioned},
        tensors={"grads": grads, "params": params, "ids": {"ids": ids}},
    )  # fmt: skip


if __name__ == "__main__":
    main()
