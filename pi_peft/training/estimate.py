"""`pi-peft estimate`: peak GPU memory of a PI (Q)LoRA training step, from the model config alone (no weights).

The formula (bytes; B = batch size, T = context length, a = bytes of an activation element: 2 for bf16, 4 for fp32;
h, i, kv = hidden, intermediate and key/value width; n = layers; V = vocabulary):

    weights      = P_linear * w_q + (P_embed + P_head + P_norm) * a
                   w_q = 0.5 + 1/64 + 4/(64*256) bytes/param for NF4 with double quantisation (4-bit codes, an 8-bit
                   absmax per 64-block, an fp32 absmax per 256 absmaxes), 0.5 + 4/64 without it, `a` unquantised.
    trainable    = P_train * (p + p + 2 * p)      parameter + gradient + AdamW's two moments, p bytes each
                   P_train = LoRA r*(in+out) per target linear + V*h (train_embeddings) + norms (train_norms);
                   p = 2 for QLoRA (trl casts the trainable parameters of a k-bit model to bf16), else 4 for LoRA
                   (peft keeps adapters in fp32) and `a` for the full embedding/norm copies.
    checkpoints  = B*T*a * n*h                     one checkpointed input per decoder layer (2*h with activation
                                                   offloading: the others wait in CPU memory)
    layer        = B*T*a * (10*h + 4*kv + 4*i      one layer recomputed for its backward (norms, q/k/v, attention
                                                   output, o_proj, residual, gate/up/act/product, down)
                            + 4*h)                 gradients flowing through that layer
                   + B*T*(a+1) * (5*h + q + i)     with `lora_dropout` > 0: the dropped copy of every LoRA input
                                                   (q/k/v/o/gate/up/down) and its 1-byte mask
                   + B*H*T^2*(a+4)  only for `attention="eager"` (scores and fp32 softmax); SDPA/FlashAttention are
                   O(T) in memory.
                   With `tiled_mlp` (pi_peft.ops.tiled_mlp) the MLP's `4*i` (and its dropout part `2*h + i`)
                   are alive for one tile of t tokens only: B*t*(a*6*i + (a+1)*(2*h + i)) (the tile's gate/up/act/
                   product and their gradients), t = `tile_tokens` or the automatic tile (~max(h, 1024) tokens).
    logits/loss  = fused (trl's chunked LM head, used by SFTTrainer): one min(B*T, 4096) x min(V, 32768) tile in `a`
                   bytes + its fp32 gradient tile, + B*T*h*4 for the fp32 hidden-state gradient;
                   chunked (`loss="chunked"`, pi_peft.ops.losses' own): c x V x (4 + 4 + 4) for one chunk of c rows
                   (fp32 logits, log-softmax, gradient) + B*T*h*4;
                   full (`loss="full"`): B*T*V*(a + 4 + 4), the logits, their fp32 copy and its gradient.
    overhead     = 1 GiB on CUDA (context, cuBLAS workspace, allocator fragmentation), 0 on CPU.

    total        = weights + trainable + checkpoints + max(layer, logits/loss) + overhead  with checkpointing: the
                   loss's backward has finished (its chunk freed) before the first layer is recomputed;
                 = weights + trainable + n * layer (all layers keep their activations) + logits + overhead without.

More than one GPU (`num_gpus` N, `sharding`, `sp_size` S, `offload`): the same terms, per GPU.

    DDP (`sharding="none"`, N > 1): every GPU holds full copies of the weights and of the trainable state, plus
                   DDP's gradient buckets (a second copy of the trainable gradients, P_train * p bytes).
    FSDP2 (`"fsdp"`): weights / N + trainable / N (parameters, gradients and AdamW moments sharded, same bytes as one
                   GPU), + gathered = the root unit's unsharded weights (embeddings, head, final norm: FSDP2 keeps
                   the root gathered through the step) + 2 decoder layers' (the one computing and the one
                   prefetched; their NF4 linears, norms and LoRA in `a` bytes).
    ZeRO-3 (`"zero3"`): weights / N + P_train * (a + a + 12) / N (bf16 parameter and gradient partitions + the
                   optimizer's fp32 master copy and two fp32 moments, ZeRO's 2 + 2 + 12 bytes/param; 16 in fp32,
                   without a master copy), + gathered =
                   max(embeddings, head, 2 decoder layers) (ZeRO-3 fetches module by module with a prefetch
                   bucket: an upper bound).
    QLoRA (NF4) under FSDP2 or ZeRO-3: `load_weights` = the whole 4-bit model, which transformers loads on every
                   rank before the engine shards it (its FSDP rank-0 loading and its ZeRO-3 `zero.Init` both skip
                   quantized models), so that must fit too (`fits`, `max_context`).
    `offload` (ZeRO-3 `offload_param` + `offload_optimizer` to CPU, as ALST's single-GPU recipe; FSDP2's
                   CPUOffloadPolicy): the sharded weights and the trainable state live in CPU memory (`offloaded`,
                   per GPU); the GPU holds the gathered weights only.
    Ulysses sequence parallelism (`sp_size` S > 1, DeepSpeed ZeRO-3 only): each rank holds t = T/S tokens of every
                   sequence, so checkpoints, the recomputed layer and logits/loss use t instead of T (eager attention:
                   B * H/S * T^2 * (a+4), its heads over the whole sequence); batch B per rank, N/S data parallel.
      all_to_all = 2 * B*t*a * (q + 2*kv')         q, k and v re-partitioned from sequence shards to head shards
                                                   (a contiguous send copy + the receive buffer of each); kv' = kv *
                                                   max(1, S / kv_heads) (kv heads replicated when S > kv_heads); the
                                                   output o's re-partition back (q wide) is smaller and not alive at
                                                   the same time, nor are the backward's gradient all-to-alls (same
                                                   sizes). Counted with the recomputed layer.
    total        = weights + gathered + trainable + checkpoints + max(layer + all_to_all, logits/loss) + overhead
                   (NCCL's communicator buffers are within the 1 GiB overhead; a GPU's share of the batch is B).

`max_context` is the largest multiple of 256 tokens (of lcm(256, S) with sequence parallelism) whose total fits the
GPU. The one-GPU formula was checked against peak RSS of one CPU training step of tiny configs in a subprocess
(`tests/test_estimate.py`, `recipes/README.md`); the multi-GPU terms are not measured yet (no multi-GPU machine:
`benchmarks/gpu_multi.py` measures them next to this estimate on one).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..utils import check_positive_int, is_positive_int, read_json_object

GIB = 1024**3
QUANTIZATIONS = ("nf4", "none")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")
LOSSES = ("fused", "chunked", "full")
SHARDINGS = ("none", "fsdp", "zero3")  # DDP (full copies; plain one GPU when num_gpus=1), FSDP2, DeepSpeed ZeRO-3
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # "all-linear" on a Llama-style decoder
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob tile shape
CUDA_OVERHEAD = 1 * GIB

# Architecture numbers of the models the shipped recipes use (their public config.json), for offline estimates.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "meta-llama/Llama-2-13b-hf": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "meta-llama/Llama-2-70b-hf": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "meta-llama/Meta-Llama-3-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "mistralai/Mistral-7B-v0.1": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),  # fmt: skip
}


@dataclass
class MemoryEstimate:
    """Estimated peak memory of one training step, per component, in bytes (see the module docstring)."""

    weights: int
    trainable: int
    checkpoints: int
    layer: int  # one recomputed layer with checkpointing, every layer without
    logits: int
    overhead: int
    context_length: int
    batch_size: int
    quantization: str
    r: int
    gradient_checkpointing: bool = True
    tile_tokens: Optional[int] = None  # MLP tile with `tiled_mlp`, else None
    # more than one GPU (module docstring): every byte above is per GPU
    num_gpus: int = 1
    sharding: str = "none"  # "none" (DDP when num_gpus > 1), "fsdp" (FSDP2) or "zero3" (DeepSpeed ZeRO-3)
    sp_size: int = 1  # Ulysses sequence parallelism: context_length / sp_size tokens per rank
    offload: bool = False  # sharded weights + trainable state in CPU memory
    gathered: int = 0  # unsharded weights in flight (FSDP2 / ZeRO-3)
    all_to_all: int = 0  # Ulysses' q/k/v re-partition buffers, alive with the recomputed layer
    offloaded: int = 0  # bytes per GPU that `offload` keeps in CPU memory (not in `total`)
    load_weights: int = 0  # 4-bit + FSDP2 / ZeRO-3: the whole 4-bit model on every GPU while it loads

    @property
    def activations(self) -> int:
        """Checkpoints + the recomputed layer (with checkpointing) or all layers (without)."""
        return self.checkpoints + self.layer

    @property
    def tokens_per_rank(self) -> int:
        """Tokens of each sequence one GPU holds: `context_length / sp_size`."""
        return self.context_length // self.sp_size

    @property
    def total(self) -> int:
        """The peak: with checkpointing the loss chunk and the recomputed layer are never alive together."""
        layer = self.layer + self.all_to_all
        peak = max(layer, self.logits) if self.gradient_checkpointing else layer + self.logits
        return self.weights + self.gathered + self.trainable + self.checkpoints + peak + self.overhead

    def fits(self, gpu_gb: float = 24.0) -> bool:
        """The training step's peak fits, and so does loading (`load_weights` + the CUDA term, 0 but for QLoRA
        under FSDP2 / ZeRO-3)."""
        return max(self.total, self.load_weights + self.overhead) <= gpu_gb * GIB

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "activations": self.activations, "total": self.total,
                "tokens_per_rank": self.tokens_per_rank}  # fmt: skip


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def load_model_config(model: str) -> dict[str, Any]:
    """Architecture numbers of `model`: a known recipe model id, a local `config.json` or model directory, or a Hub
    id (downloads `config.json` only)."""
    if model in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isdir(model) and not os.path.isfile(path):
        raise ValueError(f"`model`={model!r} is a folder without a `config.json`; pass a model folder or its config.")
    if os.path.isfile(path):
        return _read_config_json(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except OSError as e:
        raise ValueError(
            f"`model`={model!r} is neither a local config.json / model directory nor a reachable Hub id ({e}). "
            "Pass the path of its config.json."
        ) from e


def _read_config_json(path: str) -> dict[str, Any]:
    """A model's `config.json` as a dict, or a `ValueError` naming the file and what is wrong with it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        raise ValueError(
            f"`model`={path!r} is a GGUF file, not a config.json. Convert it first (`pi-peft gguf-to-hf {path} "
            "FOLDER`) and pass FOLDER, or pass the original model's config.json."
        )
    return read_json_object(path, "model", "a model config", "pass a model folder or its config.json.")


def check_gpu_gb(gpu_gb: Any) -> float:
    """`gpu_gb` as a float: a positive, finite number of GiB, or a `ValueError` naming it."""
    if isinstance(gpu_gb, bool) or not isinstance(gpu_gb, (int, float)) or not math.isfinite(gpu_gb) or gpu_gb <= 0:
        raise ValueError(f"`gpu_gb` must be a positive number of GiB (e.g. 24), got {gpu_gb!r}.")
    return float(gpu_gb)


_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _shapes(config: Any) -> dict[str, int]:
    text = config.get("text_config", config) if isinstance(config, dict) else config
    missing = [name for name in _REQUIRED if not is_positive_int(_get(text, name))]
    if missing:
        raise ValueError(
            f"`model_config` needs positive integers {', '.join(f'`{m}`' for m in missing)} (a decoder's "
            f"config.json has them), got {config!r:.200}."
        )
    h = _get(text, "hidden_size")
    heads = _get(text, "num_attention_heads")
    head_dim = _get(text, "head_dim") or h // heads
    return dict(
        h=h,
        i=_get(text, "intermediate_size") or 4 * h,
        n=_get(text, "num_hidden_layers"),
        heads=heads,
        q=heads * head_dim,
        kv=(_get(text, "num_key_value_heads") or heads) * head_dim,
        kv_heads=_get(text, "num_key_value_heads") or heads,
        V=_get(text, "vocab_size"),
        tied=bool(_get(text, "tie_word_embeddings", False)),
    )


def _linear_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    # (in, out) of each linear in one decoder layer
    h, i, q, kv = s["h"], s["i"], s["q"], s["kv"]
    return dict(q=(h, q), k=(h, kv), v=(h, kv), o=(q, h), gate=(h, i), up=(h, i), down=(i, h))


def check_parallelism(
    num_gpus: Any, sharding: Any, sp_size: Any, offload: bool, context_length: int, heads: int, kv_heads: int
) -> None:
    """A `ValueError` naming the setting, its value and the fix when a multi-GPU layout cannot run (or would run
    silently wrong: Ulysses without ZeRO-3 is DeepSpeed #5248's doubled loss and gradients with ZeRO-1/2)."""
    check_positive_int("num_gpus", num_gpus, "GPUs of the run", "Use --num-gpus 1 for one GPU.")
    check_positive_int(
        "sp_size", sp_size, "GPUs that share one sequence", "Use --sp-size 1 for no sequence parallelism."
    )
    if sharding not in SHARDINGS:
        raise ValueError(f"`sharding` must be one of {SHARDINGS}, got {sharding!r}.")
    if num_gpus % sp_size:
        divisors = [d for d in range(1, num_gpus + 1) if num_gpus % d == 0]
        raise ValueError(
            f"`sp_size`={sp_size} must divide `num_gpus`={num_gpus} (each group of sp_size GPUs shares one sequence); "
            f"use one of {divisors}."
        )
    if sp_size > 1:
        if sharding != "zero3":
            engine = "FSDP2" if sharding == "fsdp" else "DDP" if num_gpus > 1 else "one GPU"
            raise ValueError(
                f"`sp_size`={sp_size} needs DeepSpeed ZeRO-3 (`--zero3`), got {engine}: Ulysses sequence parallelism "
                "in transformers/accelerate runs on DeepSpeed (parallelism_config_sp_backend: deepspeed), and with "
                "ZeRO-1/2 its loss and gradients come out doubled (DeepSpeed #5248). Add --zero3 "
                "(recipes/accelerate/ulysses-zero3.yaml)."
            )
        if heads % sp_size:
            raise ValueError(
                f"`sp_size`={sp_size} must divide the model's `num_attention_heads`={heads} (Ulysses gives each rank "
                f"heads / sp_size of them); use one of {[d for d in range(1, heads + 1) if heads % d == 0]}."
            )
        if kv_heads % sp_size and sp_size % kv_heads:
            raise ValueError(
                f"`sp_size`={sp_size} and the model's `num_key_value_heads`={kv_heads}: one must divide the other "
                "(Ulysses splits the kv heads over the ranks or replicates them); pick sp_size accordingly."
            )
        if context_length % sp_size:
            raise ValueError(
                f"`context_length`={context_length} is not a multiple of `sp_size`={sp_size} (each rank holds "
                f"context_length / sp_size tokens); use {context_length // sp_size * sp_size} or "
                f"{-(-context_length // sp_size) * sp_size}."
            )
    if offload and sharding == "none":
        raise ValueError(
            "`offload` (CPU offload of the sharded weights and optimizer) needs sharding: add --zero3 (ZeRO-3 "
            "offload_param/offload_optimizer, recipes/accelerate/zero3-offload.yaml) or --fsdp."
        )


def estimate_memory(
    model_config: Any,
    context_length: int,
    *,
    quantization: str = "nf4",
    r: int = 16,
    batch_size: int = 1,
    gradient_checkpointing: bool = True,
    train_embeddings: bool = True,
    train_norms: bool = True,
    double_quant: bool = True,
    dtype_bytes: int = 2,
    attention: str = "sdpa",
    loss: str = "fused",
    loss_chunk_tokens: int = 1024,  # = pi_peft.training.memory.DEFAULT_CHUNK_TOKENS (tested)
    activation_offloading: bool = False,
    lora_dropout: float = 0.0,
    tiled_mlp: bool = False,
    tile_tokens: Optional[int] = None,
    device: str = "cuda",
    num_gpus: int = 1,
    sharding: str = "none",
    sp_size: int = 1,
    offload: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of one (Q)LoRA training step at `context_length` tokens (module docstring formula).

    Args:
        model_config: a transformers config, its dict, or a path / model id for [`load_model_config`].
        context_length (`int`): tokens per sequence T.
        quantization (`str`): `"nf4"` (QLoRA) or `"none"` (LoRA on a `dtype_bytes` base).
        r (`int`): LoRA rank on all linear layers.
        batch_size (`int`): sequences per step B.
        gradient_checkpointing (`bool`): without it every layer keeps its full activations.
        dtype_bytes (`int`): bytes of an activation / unquantised weight (2 = bf16, 4 = fp32 as in CPU tests).
        attention (`str`): `"sdpa"`, `"flash_attention_2"` (both O(T)) or `"eager"` (O(T^2)).
        loss (`str`): `"fused"` (SFTTrainer's chunked LM head), `"chunked"` (`pi_peft.training.memory`'s own chunked
        loss
            with `loss_chunk_tokens` rows per chunk) or `"full"` (materialised logits).
        activation_offloading (`bool`): checkpointed layer inputs wait in CPU memory (trl's `activation_offloading`);
            two layers' worth are counted on the GPU.
        lora_dropout (`float`): LoRA dropout; above 0 every LoRA layer keeps a dropped copy of its input and a mask.
        tiled_mlp (`bool`): the MLPs run over sequence tiles (`pi_peft.ops.tiled_mlp.apply_tiled_mlp`).
        tile_tokens (`int`, *optional*): the tile with `tiled_mlp`; default the automatic one
            (`pi_peft.ops.tiled_mlp.auto_tile_tokens`).
        device (`str`): `"cuda"` adds the CUDA overhead, `"cpu"` does not.
        num_gpus (`int`): GPUs of the run (every byte of the estimate is per GPU).
        sharding (`str`): `"none"` (one GPU, or DDP's full copies), `"fsdp"` (FSDP2) or `"zero3"` (DeepSpeed ZeRO-3).
        sp_size (`int`): Ulysses sequence-parallel degree S (DeepSpeed, so `sharding="zero3"`): T/S tokens per rank.
        offload (`bool`): sharded weights and trainable state in CPU memory (ZeRO-3 / FSDP2 CPU offload).
    """
    if isinstance(model_config, str):
        model_config = load_model_config(model_config)
    for name, value, allowed in (
        ("quantization", quantization, QUANTIZATIONS),
        ("attention", attention, ATTENTIONS),
        ("loss", loss, LOSSES),
    ):
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    for name, value in (("context_length", context_length), ("r", r), ("batch_size", batch_size)):
        check_positive_int(name, value)
    s = _shapes(model_config)
    check_parallelism(num_gpus, sharding, sp_size, offload, context_length, s["heads"], s["kv_heads"])
    h, i, n, kv, V, a = s["h"], s["i"], s["n"], s["kv"], s["V"], dtype_bytes
    B, T, S = batch_size, context_length // sp_size, sp_size  # T: the tokens of a sequence on one rank
    linears = _linear_shapes(s)

    # weights
    p_linear = n * sum(fan_in * fan_out for fan_in, fan_out in linears.values())
    p_norm = (2 * n + 1) * h
    p_other = V * h * (1 if s["tied"] else 2) + p_norm
    if quantization == "nf4":
        w_q = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    else:
        w_q = a
    weights = int(p_linear * w_q + p_other * a)
    p_lora_layer = sum(r * (fan_in + fan_out) for fan_in, fan_out in linears.values())
    layer_weights = (p_linear // n) * w_q + (2 * h + p_lora_layer) * a  # one decoder layer, unsharded

    # LoRA + full copies + gradients + AdamW moments
    p_lora = n * sum(r * (fan_in + fan_out) for fan_in, fan_out in linears.values())
    p_full = (V * h if train_embeddings else 0) + (p_norm if train_norms else 0)
    lora_bytes = 2 if quantization == "nf4" else 4
    full_bytes = 2 if quantization == "nf4" else a
    trainable = 4 * (p_lora * lora_bytes + p_full * full_bytes)
    gathered = offloaded = load_weights = 0
    if sharding == "none" and num_gpus > 1:  # DDP: + its gradient buckets, a second copy of the gradients
        trainable += p_lora * lora_bytes + p_full * full_bytes
    elif sharding != "none":
        if sharding == "zero3":  # bf16 parameter + gradient, fp32 master + 2 moments (fp32 training: no master)
            trainable = (p_lora + p_full) * (a + a + 12 if a < 4 else 16)
            gathered = max(V * h * a, 2 * layer_weights)  # the embeddings and head are V * h each
        else:  # FSDP2: the root unit (embeddings, head, final norm) stays gathered; 2 layers in flight
            gathered = (V * h * (1 if s["tied"] else 2) + h) * a + 2 * layer_weights
        if quantization == "nf4":  # transformers skips rank-0 loading (FSDP) and zero.Init (ZeRO-3) when quantized
            load_weights = weights
        weights, trainable = weights / num_gpus, trainable / num_gpus
        if offload:
            offloaded, weights, trainable = weights + trainable, 0, 0

    # activations: checkpoints + one recomputed layer (or every layer without checkpointing)
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"`lora_dropout` must be in [0, 1), got {lora_dropout!r}.")
    if tile_tokens is not None and not tiled_mlp:
        raise ValueError(f"`tile_tokens`={tile_tokens} has no effect without `tiled_mlp=True`; set both or neither.")
    if tile_tokens is not None and not is_positive_int(tile_tokens):  # (torch-free: ops.tiled_mlp imports torch)
        raise ValueError(f"`tile_tokens` must be a positive int or None (automatic), got {tile_tokens!r}.")
    q = s["q"]
    dropped = 5 * h + q + i if lora_dropout > 0 else 0  # elements per token of the LoRA inputs' dropped copies
    mlp_dropped = 2 * h + i if lora_dropout > 0 else 0
    mlp_tile = None
    if tiled_mlp:
        if tile_tokens is None:
            from ..ops.tiled_mlp import auto_tile_tokens

            mlp_tile = auto_tile_tokens(T, h)
        else:
            mlp_tile = min(tile_tokens, T)
        # the MLP's intermediates for one tile (values + gradients); the rest of the layer for the whole sequence
        layer = B * T * (a * (14 * h + 4 * kv) + (a + 1) * (dropped - mlp_dropped))
        layer += B * mlp_tile * (a * 6 * i + (a + 1) * mlp_dropped)
    else:
        layer = B * T * (a * (14 * h + 4 * kv + 4 * i) + (a + 1) * dropped)
    if attention == "eager":  # with sequence parallelism each rank's heads / S heads see the whole sequence
        layer += B * (s["heads"] // S) * context_length**2 * (a + 4)
    all_to_all = 0
    if S > 1:  # Ulysses: q, k, v from sequence to head shards, a send copy + a receive buffer of each
        kv_wide = kv * max(1, S // s["kv_heads"])  # kv heads replicated up to S
        all_to_all = 2 * B * T * a * (q + 2 * kv_wide)
    if gradient_checkpointing:
        checkpoints = B * T * a * (min(n, 2) * h if activation_offloading else n * h)
    else:
        checkpoints = 0
        layer = n * (layer - B * T * a * 4 * h) + B * T * a * 4 * h  # every layer's activations, gradients once

    # logits / loss
    N = B * T
    if loss == "fused":
        tile = min(N, TRL_TILE_TOKENS) * min(V, TRL_TILE_VOCAB)
        logits = tile * (a + 4) + N * h * 4
    elif loss == "chunked":
        logits = min(N, loss_chunk_tokens) * V * (4 + 4 + 4) + N * h * 4
    else:
        logits = N * V * (a + 4 + 4)

    overhead = CUDA_OVERHEAD if device == "cuda" else 0
    return MemoryEstimate(
        weights=int(weights),
        trainable=int(trainable),
        checkpoints=int(checkpoints),
        layer=int(layer),
        logits=int(logits),
        overhead=overhead,
        context_length=context_length,
        batch_size=B,
        quantization=quantization,
        r=r,
        gradient_checkpointing=gradient_checkpointing,
        tile_tokens=mlp_tile,
        num_gpus=num_gpus,
        sharding=sharding,
        sp_size=S,
        offload=offload,
        gathered=int(gathered),
        all_to_all=int(all_to_all),
        offloaded=int(offloaded),
        load_weights=int(load_weights),
    )


def max_context(model_config: Any, gpu_gb: float = 24.0, *, multiple_of: int = 256, **kwargs) -> int:
    """The largest context length (a multiple of `multiple_of`) whose [`estimate_memory`] fits in `gpu_gb` GiB;
    0 when not even `multiple_of` tokens fit. `kwargs` go to [`estimate_memory`]."""
    if isinstance(model_config, str):
        model_config = load_model_config(model_config)
    budget = check_gpu_gb(gpu_gb) * GIB
    multiple_of = math.lcm(multiple_of, kwargs.get("sp_size", 1))  # every rank holds the same number of tokens

    def fits(k: int) -> bool:
        return estimate_memory(model_config, k * multiple_of, **kwargs).fits(budget / GIB)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):  # the total grows with T, so double then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * multiple_of


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


ENGINES = {"none": "DDP", "fsdp": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}


def is_multi_gpu(est: MemoryEstimate) -> bool:
    """More than one GPU, or a sharded / sequence-parallel layout (ZeRO-3 with offload on one GPU counts)."""
    return est.num_gpus > 1 or est.sharding != "none" or est.sp_size > 1


def engine_label(est: MemoryEstimate) -> str:
    """`1`, `2 x DDP`, `2 x FSDP2`, `8 x DeepSpeed ZeRO-3 + Ulysses SP 8`, ... + `, CPU offload`."""
    if not is_multi_gpu(est):
        return "1"
    label = f"{est.num_gpus} x {ENGINES[est.sharding]}"
    label += f" + Ulysses SP {est.sp_size}" if est.sp_size > 1 else ""
    return label + (", CPU offload" if est.offload else "")


def parallel_assumptions(est: MemoryEstimate) -> list[str]:
    """What the per-GPU numbers of a multi-GPU layout assume (the module docstring's terms, in words)."""
    N, S = est.num_gpus, est.sp_size
    lines = []
    if est.sharding == "none":
        lines.append(f"DDP: full weights and trainable state on each of the {N} GPUs, + DDP's gradient buckets (a "
                     "second copy of the trainable gradients)")  # fmt: skip
    elif est.sharding == "fsdp":
        lines.append(f"FSDP2 FULL_SHARD: weights, LoRA params, grads and AdamW moments sharded over {N} GPUs; "
                     "gathered = the root unit (embeddings, head, final norm; kept gathered through the step) + 2 "
                     "decoder layers (computing + prefetched)")  # fmt: skip
    else:
        lines.append(f"ZeRO-3: weights and trainable state partitioned over {N} GPUs, 16 bytes per trainable param "
                     "(bf16 param + grad, fp32 master + 2 AdamW moments); gathered = max(embeddings, head, 2 "
                     "decoder layers) (module-by-module fetch with prefetch: an upper bound)")  # fmt: skip
    if est.load_weights:
        lines.append(f"loading: transformers loads a 4-bit model whole on every GPU before {ENGINES[est.sharding]} "
                     f"shards it (FSDP's rank-0 loading and ZeRO-3's zero.Init skip quantized models): "
                     f"{_gib(est.load_weights)} GiB + CUDA must fit too")  # fmt: skip
    if est.offload:
        lines.append(f"offload: the shards and the optimizer ({_gib(est.offloaded)} GiB per GPU) live in CPU memory; "
                     "the GPU holds the gathered weights only")  # fmt: skip
    if S > 1:
        lines.append(f"Ulysses SP {S}: each rank holds {est.tokens_per_rank} tokens of every sequence (context / "
                     f"{S}) for checkpoints, layers and loss; batch {est.batch_size} per rank, {N // S}-way data "
                     "parallel")  # fmt: skip
        lines.append("all-to-all = 2 * B * (T/S) * a * (q + 2*kv'): q, k, v re-partitioned from sequence to head "
                     "shards, a send copy + a receive buffer each (kv' = kv heads replicated up to S); o's "
                     "re-partition back is smaller and not alive at the same time")  # fmt: skip
    lines.append(
        "NCCL buffers within the 1 GiB CUDA term; not measured on a multi-GPU machine (benchmarks/gpu_multi.py)"
    )
    return lines


def format_estimate(est: MemoryEstimate, gpu_gb: float = 24.0, largest: Optional[int] = None) -> str:
    """A human-readable breakdown and verdict (per GPU, with the assumptions, for a multi-GPU layout)."""
    multi = is_multi_gpu(est)
    shard = f" (1/{est.num_gpus} shard)" if est.sharding != "none" and not est.offload else ""
    shard = " (offloaded to CPU)" if est.offload else shard
    tokens = f" ({est.tokens_per_rank} tokens per rank)" if est.sp_size > 1 else ""
    rows = [
        ("weights" + shard, est.weights),
        *([("gathered (unsharded) weights in flight", est.gathered)] if est.sharding != "none" else []),
        (f"LoRA r={est.r} (+ embeddings/norms) params + grads + AdamW" + ("" if multi else ""), est.trainable),
        ("checkpointed layer inputs" + tokens, est.checkpoints),
        ("recomputed layer" + (f" (MLP in tiles of {est.tile_tokens} tokens)" if est.tile_tokens else ""), est.layer),
        *([("Ulysses all-to-all buffers (q, k, v re-partition)", est.all_to_all)] if est.sp_size > 1 else []),
        ("logits / loss", est.logits),
        ("CUDA context + allocator", est.overhead),
        ("total" + (" per GPU" if multi else ""), est.total),
    ]
    lines = [f"context {est.context_length}, batch {est.batch_size}, quantization {est.quantization}"]
    if multi:
        lines[0] += f", GPUs {engine_label(est)}"
    if est.gradient_checkpointing:
        if multi:
            lines.append("  total = weights + gathered + LoRA + checkpoints + max(recomputed layer + all-to-all, "
                         "logits / loss) + CUDA, per GPU")  # fmt: skip
        else:
            lines.append("  total = weights + LoRA + checkpoints + max(recomputed layer, logits / loss) + CUDA")
    lines += [f"  {name:<58} {_gib(value):>8} GiB" for name, value in rows]
    verdict = "fits" if est.fits(gpu_gb) else "does NOT fit"
    lines.append(f"  -> {verdict} in {gpu_gb:g} GiB" + (" per GPU" if multi else ""))
    if est.load_weights + est.overhead > gpu_gb * GIB:
        lines[-1] += f" (loading: the whole 4-bit model + CUDA, {_gib(est.load_weights + est.overhead)} GiB)"
    if largest is not None:
        lines.append(f"  largest context that fits in {gpu_gb:g} GiB" + (" per GPU" if multi else "")
                     + f": {largest} tokens")  # fmt: skip
    if multi:
        lines += ["  assumptions:"] + [f"    - {line}" for line in parallel_assumptions(est)]
    return "\n".join(lines)


PARALLEL_KEYS = ("num_gpus", "sharding", "sp_size", "offload")


def parallelism_from_accelerate_config(path: str) -> dict[str, Any]:
    """`num_gpus`, `sharding`, `sp_size` and `offload` of an accelerate config YAML (`recipes/accelerate/*.yaml`):
    `num_processes`; `distributed_type` MULTI_GPU (DDP), FSDP or DEEPSPEED with `zero_stage: 3`;
    `parallelism_config.parallelism_config_sp_size`; DeepSpeed's `offload_param_device` / `offload_optimizer_device`
    or FSDP's `fsdp_offload_params`. A `ValueError` names the file and the key it cannot estimate."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"accelerate config {path!r} cannot be read as YAML ({exc}).") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise ValueError(f"accelerate config {path!r} has no `distributed_type`; write one with `accelerate config`.")
    kind, ds, fsdp = cfg["distributed_type"], cfg.get("deepspeed_config") or {}, cfg.get("fsdp_config") or {}
    num_gpus = cfg.get("num_processes", 1)
    if kind in ("NO", "MULTI_GPU"):  # one GPU, or DDP
        sharding = "none"
    elif kind == "FSDP":
        sharding = "fsdp"
    elif kind == "DEEPSPEED" and ds.get("zero_stage") == 3:
        sharding = "zero3"
    else:
        detail = f" with `zero_stage: {ds.get('zero_stage')}`" if kind == "DEEPSPEED" else ""
        raise ValueError(
            f"accelerate config {path!r}: `distributed_type: {kind}`{detail} is not a GPU layout the estimator "
            "models; use NO, MULTI_GPU (DDP), FSDP or DEEPSPEED with `zero_stage: 3`."
        )
    offload = fsdp.get("fsdp_offload_params") is True or any(
        str(ds.get(key, "none")).lower() != "none" for key in ("offload_param_device", "offload_optimizer_device")
    )
    sp_size = (cfg.get("parallelism_config") or {}).get("parallelism_config_sp_size", 1)
    return dict(num_gpus=num_gpus, sharding=sharding, sp_size=sp_size, offload=offload)


def recipe_accelerate_config(path: str) -> Optional[str]:
    """The accelerate config a recipe's header runs it with (`accelerate launch --config_file CFG ...`), or None for a
    one-GPU recipe. CFG is relative to the working directory, else to the folder above the recipe's (the repo)."""
    import re

    with open(path, encoding="utf-8") as f:
        header = [line for line in f.read().split("\n") if line.startswith("#")]
    found = [m.group(1) for line in header if (m := re.search(r"accelerate launch --config_file (\S+)", line))]
    if not found:
        return None
    if len(set(found)) > 1:
        raise ValueError(f"recipe {path!r} names several accelerate configs in its header: {sorted(set(found))}.")
    cfg = found[0]
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), cfg)
    if not os.path.isfile(cfg) and not os.path.isfile(beside):
        raise ValueError(
            f"recipe {path!r} is launched with `accelerate launch --config_file {cfg}` (its header), and {cfg!r} is "
            f"neither in the working directory nor at {beside!r}; run from the repo or pass `--accelerate-config`."
        )
    return cfg if os.path.isfile(cfg) else beside


def recipe_row(path: str, gpu_gb: float = 24.0, parallel: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Estimate for a recipe YAML (`model_name_or_path`, `context_length`, `load_in_4bit`, `lora_r`, ...), per GPU
    under `parallel` (`num_gpus`, `sharding`, `sp_size`, `offload`), by default the accelerate config its header
    launches it with ([`recipe_accelerate_config`]; one GPU without)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"recipe {path!r} cannot be read as YAML ({exc}).") from None
    missing = [k for k in ("model_name_or_path", "context_length") if not isinstance(recipe, dict) or k not in recipe]
    if missing:
        raise ValueError(f"recipe {path!r} has no {' or '.join(f'`{k}`' for k in missing)}; a recipe needs both.")
    accelerate_config = None
    if parallel is None:
        accelerate_config = recipe_accelerate_config(path)
        parallel = parallelism_from_accelerate_config(accelerate_config) if accelerate_config else {}
    kwargs = dict(
        quantization="nf4" if recipe.get("load_in_4bit") else "none",
        r=int(recipe.get("lora_r", 16)),
        batch_size=int(recipe.get("per_device_train_batch_size", 1)),
        train_embeddings=bool(recipe.get("train_embeddings", True)),
        train_norms=bool(recipe.get("train_norms", True)),
        activation_offloading=bool(recipe.get("activation_offloading", False)),
        lora_dropout=float(recipe.get("lora_dropout", 0.05)),  # trl's ModelConfig default
        tiled_mlp=bool(recipe.get("tiled_mlp", False)),
        tile_tokens=recipe.get("tile_tokens"),
        **{k: v for k, v in parallel.items() if k in PARALLEL_KEYS},
    )
    config = load_model_config(recipe["model_name_or_path"])
    est = estimate_memory(config, int(recipe["context_length"]), **kwargs)
    return dict(recipe=os.path.basename(path), model=recipe["model_name_or_path"], estimate=est,
                max_context=max_context(config, gpu_gb, **kwargs), accelerate_config=accelerate_config)  # fmt: skip


def recipes_table(paths: list[str], gpu_gb: float = 24.0, parallel: Optional[dict[str, Any]] = None) -> str:
    """A markdown table of the estimates of recipe YAMLs; the multi-GPU ones (per GPU, with the GPUs, gathered-weights
    and all-to-all columns) in a second table after the one-GPU ones."""
    rows = [recipe_row(path, gpu_gb, parallel) for path in paths]
    one = [row for row in rows if not is_multi_gpu(row["estimate"])]
    several = [row for row in rows if is_multi_gpu(row["estimate"])]
    return "\n\n".join(_table(group, multi) for group, multi in ((one, False), (several, True)) if group)


def _table(rows: list[dict[str, Any]], multi: bool) -> str:
    names = ["recipe", "model", "context", *(["GPUs"] if multi else []), "weights", *(["gathered"] if multi else [])]
    names += ["LoRA+optim", "checkpoints", "recomputed layer", *(["all-to-all"] if multi else []), "logits"]
    names += ["overhead", "total (GiB)" + (" per GPU" if multi else ""), "max context"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        e = row["estimate"]
        cells = [row["recipe"], row["model"], str(e.context_length), *([engine_label(e)] if multi else [])]
        sizes = [e.weights, *([e.gathered] if multi else []), e.trainable, e.checkpoints, e.layer]
        sizes += [*([e.all_to_all] if multi else []), e.logits, e.overhead, e.total]
        cells += [_gib(x) for x in sizes]
        cells.append(str(row["max_context"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- time: FLOPs of a training step (S²-Attn) -----------------------------------------------------------------------
def causal_attention_pairs(context_length: int, s2_group_size_ratio: Optional[float] = None) -> int:
    """Query-key pairs one causal attention head computes over T tokens: T(T+1)/2, or with S²-Attn the sum over its
    blocks of G = int(ratio * T) tokens, averaged over the unshifted and the shifted half of the heads (~T*G/2)."""
    T = context_length
    if s2_group_size_ratio is None:
        return T * (T + 1) // 2
    G = int(s2_group_size_ratio * T)
    if not 0 < s2_group_size_ratio <= 1 or G < 2:  # S²-Attn's rule (pi_peft.ops.s2_attn.s2_group_size)
        raise ValueError(
            f"`s2_group_size_ratio`={s2_group_size_ratio:g} gives S²-Attn blocks of {G} token(s) at "
            f"`context_length`={T}; it must be in (0, 1] with a block of at least 2 tokens, i.e. >= {2 / T:.4g}."
        )

    def blocks(first: int) -> int:
        sizes = ([first] if first else []) + [G] * ((T - first) // G)
        sizes.append(T - sum(sizes))
        return sum(n * (n + 1) // 2 for n in sizes)

    return (blocks(0) + blocks(G - G // 2)) // 2


def training_flops(
    model_config: Any,
    context_length: int,
    *,
    batch_size: int = 1,
    s2_group_size_ratio: Optional[float] = None,
    gradient_checkpointing: bool = True,
) -> dict[str, int]:
    """FLOPs of one LoRA training step, an estimate of its time (`dense`, `attention`, `lm_head`, `total`).

    Dense layers (frozen, so no weight gradient; LoRA's own matmuls are left out): 2 FLOPs per weight and token
    forward, 2 for the input gradient, 2 more for the recomputation with gradient checkpointing; the LM head 3 x 2 (its
    chunked losses recompute each chunk in the backward). Attention: 2 matmuls
    (QK^T, PV) of 2 FLOPs per query-key pair and query channel forward, 5 in FlashAttention's backward (QK^T again, dV,
    dP, dQ, dK), 2 more recomputed; the pairs of [`causal_attention_pairs`], so S²-Attn (`s2_group_size_ratio`)
    divides the attention term by about T / G. Memory does not change with S²: SDPA and FlashAttention are O(T)
    either way (`estimate_memory`)."""
    if isinstance(model_config, str):
        model_config = load_model_config(model_config)
    s = _shapes(model_config)
    passes = 3 if gradient_checkpointing else 2
    tokens = batch_size * context_length
    dense = passes * 2 * tokens * s["n"] * sum(a * b for a, b in _linear_shapes(s).values())
    matmuls = 9 if gradient_checkpointing else 7
    pairs = causal_attention_pairs(context_length, s2_group_size_ratio)
    attention = matmuls * 2 * s["q"] * s["n"] * batch_size * pairs
    lm_head = 3 * 2 * tokens * s["h"] * s["V"]
    return dict(dense=dense, attention=attention, lm_head=lm_head, total=dense + attention + lm_head)
