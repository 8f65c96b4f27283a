"""`pi-peft train` options, launched by `dist_workers.common.launch` (torchrun, 2 processes): the product path
(`pi_peft.training.sft.main` with `--deepspeed ds.json`, and Ulysses SP when the environment sets
`ACCELERATE_USE_PARALLELISM_CONFIG` / `PARALLELISM_CONFIG_SP_*`), with DeepSpeed's engine instrumented to record, for
every step and rank: the batch the engine got, the loss it backpropagated, the partitioning of the trainable
parameters and their full (gathered) values and gradients before the optimizer step. Each rank writes them with
`dist_workers.common.write_result` (JSON + safetensors) for tests/test_distributed_deepspeed.py.

On CPU the options include `--use_cpu`: transformers then gives accelerate the gloo backend and DeepSpeed's engine
spans both processes (without it accelerate counts one process per rank, which `check_engine` refuses).

Test-only knobs, by environment: `PI_TEST_LORA_B_NONZERO=1` makes the adapter start with nonzero LoRA B
(`init_lora_weights=False`), so that the first step's LoRA A gradients are not zero;
`PI_TEST_TILED_MLP_NO_ZERO3_PATH=1` runs the tiled MLP's one-process path under ZeRO-3 (a negative control: it must
fail).
"""

import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    argv = sys.argv[1:]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import deepspeed
    import deepspeed.ops
    from deepspeed.runtime.engine import DeepSpeedEngine

    # DeepSpeed's CPU backend would first JIT-compile its shared-memory all-reduce (a C++ build of many minutes on a
    # shared 2-core machine; two ranks wait on one file lock, forever if a killed run left it): a speed-up only.
    # Without it the collectives are gloo's, the same values.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.utils import safe_get_full_grad

    import pi_peft.training.sft as sft
    from pi_peft.cli.train import parse_train_args

    if os.environ.get("PI_TEST_LORA_B_NONZERO") == "1":
        make_pi_config = sft.make_pi_config

        def nonzero_b(*args, **kwargs):
            config = make_pi_config(*args, **kwargs)
            config.init_lora_weights = False
            return config

        sft.make_pi_config = nonzero_b

    # the tiled MLP's ZeRO-3 path: the tile count each MLP call agreed on with the other ranks
    import pi_peft.ops.tiled_mlp as tiled_mlp

    agreed: list[int] = []
    agreed_tile_count = tiled_mlp.agreed_tile_count

    def recorded_tile_count(*args, **kwargs):
        agreed.append(agreed_tile_count(*args, **kwargs))
        return agreed[-1]

    tiled_mlp.agreed_tile_count = recorded_tile_count
    if os.environ.get("PI_TEST_TILED_MLP_NO_ZERO3_PATH") == "1":  # negative control: the one-process path
        tiled_mlp.zero3_params = lambda module: []

    steps: list[dict] = []
    orig_forward, orig_backward, orig_step = DeepSpeedEngine.forward, DeepSpeedEngine.backward, DeepSpeedEngine.step

    def forward(self, *args, **kwargs):
        if self.module.training:
            keep = ("input_ids", "position_ids", "labels", "shift_labels", "attention_mask")
            steps.append({"inputs": {k: v.detach().clone() for k, v in kwargs.items() if k in keep and v is not None}})
        return orig_forward(self, *args, **kwargs)

    def backward(self, loss, *args, **kwargs):
        steps[-1]["loss"] = loss.item()
        return orig_backward(self, loss, *args, **kwargs)

    def step(self, *args, **kwargs):
        record = steps[-1]
        record["zero_stage"] = self.zero_optimization_stage()
        record["world_size"] = torch.distributed.get_world_size()
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        record["partition"] = {
            n: (
                getattr(p, "ds_numel", None),
                p.numel(),
                int(getattr(p, "ds_tensor", p).numel()),
                str(getattr(p, "ds_status", None)),
            )
            for n, p in trainable
        }
        record["grads"] = {n: safe_get_full_grad(p).detach().clone() for n, p in trainable}
        with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
            record["params"] = {n: p.detach().clone() for n, p in trainable}
        rotary = [m for n, m in self.module.named_modules() if n.endswith("rotary_emb")]
        record["inv_freq"] = rotary[0].inv_freq.detach().clone()
        return orig_step(self, *args, **kwargs)

    DeepSpeedEngine.forward, DeepSpeedEngine.backward, DeepSpeedEngine.step = forward, backward, step

    trainer = sft.main(*parse_train_args(argv))
    from dist_workers.common import write_result

    pc = trainer.accelerator.parallelism_config
    payload = {"sp_size": pc.sp_size if pc else 1, "agreed_tiles": agreed, "steps": []}
    tensors = {}
    for i, record in enumerate(steps):
        payload["steps"].append({k: record[k] for k in ("loss", "zero_stage", "world_size", "partition")})
        for group in ("inputs", "grads", "params"):
            tensors[f"step{i}_{group}"] = record[group]
        tensors[f"step{i}_rope"] = {"inv_freq": record["inv_freq"]}
    write_result(payload, tensors=tensors)


if __name__ == "__main__":
    main()
