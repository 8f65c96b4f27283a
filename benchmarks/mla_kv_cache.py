"""KV cache, peak memory and decode speed of generation: original attention vs MHA2MLA at two compression levels.

    python benchmarks/mla_kv_cache.py --json-out benchmarks/results/mla_kv_cache.json \
        | tee benchmarks/results/mla_kv_cache.txt

One Llama-2-shaped model (multi-head attention, head_dim 64, 32k vocabulary; `MLA_DIMS`, random weights: memory and
speed do not depend on the values) generates greedily at every context T (4k, 8k): a T - 32 token prompt in one
prefill, then 32 new tokens one at a time with the model's cache, in three configurations:

- `original`: the base model and transformers' `DynamicCache` (full K and V: 2 x kv_heads x head_dim per token).
- `mla-moderate`: `MLAConfig(kv_rank=hidden/4, rope_dims=head_dim/8)` (+ rank-8 LoRA on q_proj), `MLACache`.
- `mla-paper`: the paper's Llama-2-7B ratio (d_kv = head_dim/8 per head -> kv_rank = hidden/8, rope_dims =
  head_dim/32; 92.2% smaller cache there), `MLACache`.

Each (configuration, T) runs in a fresh subprocess on one thread. Reported: cache bytes per token and layer (counted
from the cache's tensors after generation), the cache in MiB, the process's peak RSS (`VmHWM`) above the loaded
model during the prefill and, separately (the mark is reset after the prefill), during decoding, where the cache is
what grows; prefill time and decode speed (wall and CPU ms per new token; CPU time is the steadier number on a
shared machine). Workers run with `MALLOC_MMAP_THRESHOLD_` pinned (`pi_peft.training.measure.MMAP_THRESHOLD`) so that
RSS
follows the live tensors, not glibc's retained heap. Ratios are MLA / original from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MLA_DIMS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,  # head_dim 64
    num_key_value_heads=8,  # multi-head attention, as Llama-2-7B
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
SMOKE_DIMS: dict[str, Any] = dict(MLA_DIMS, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
CONFIGS = ("original", "mla-moderate", "mla-paper")
NEW_TOKENS = 32


def mla_settings(config: str, dims: dict[str, Any]) -> dict[str, int]:
    """`kv_rank`/`rope_dims` of an MLA configuration for a model of ``dims``."""
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    if config == "mla-moderate":
        return dict(kv_rank=dims["hidden_size"] // 4, rope_dims=max(2, head_dim // 8))
    if config == "mla-paper":
        return dict(kv_rank=dims["hidden_size"] // 8, rope_dims=max(2, head_dim // 32))
    raise ValueError(config)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pi_peft.training.measure import current_rss, peak_rss, reset_peak_rss

    torch.set_num_threads(spec["threads"])
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    import pi_peft  # noqa: F401  (registers MLA with peft)
    from pi_peft.tuners.mla import MLACache, MLAConfig

    dims, config, context = spec["dims"], spec["config"], spec["context"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**dims)).eval()
    if config != "original":
        settings = mla_settings(config, dims)
        model = get_peft_model(model, MLAConfig(**settings, target_modules=["q_proj"], r=8)).eval()
    cache = DynamicCache() if config == "original" else MLACache()
    prompt = torch.randint(
        0, dims["vocab_size"], (1, context - NEW_TOKENS), generator=torch.Generator().manual_seed(1)
    )
    model_rss = current_rss()
    reset = reset_peak_rss()
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        token = out.logits[:, -1:].argmax(-1)
        del out
        prefill_peak = peak_rss()
        decode_reset = reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(NEW_TOKENS):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = cache.get_seq_length()
    layers = [layer for layer in cache.layers if layer.is_initialized]
    cache_bytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    return dict(
        config=config,
        context=context,
        cached_tokens=tokens,
        settings=mla_settings(config, dims) if config != "original" else None,
        values_per_token_layer=cache_bytes // (tokens * len(layers) * 4),
        cache_bytes_per_token_layer=cache_bytes / (tokens * len(layers)),
        cache_bytes=cache_bytes,
        model_rss=model_rss,
        prefill_peak_rss=prefill_peak,
        decode_peak_rss=peak_rss(),
        peak_rss_reset=reset and decode_reset,
        prefill_s=prefill_s,
        prefill_cpu_s=prefill_cpu,
        decode_ms_per_token=1000 * decode_s / NEW_TOKENS,
        decode_cpu_ms_per_token=1000 * decode_cpu / NEW_TOKENS,
    )


def main(argv: list[str] | None = None) -> int:
    from _common import machine_info, machine_line, markdown_table, write_json

    from pi_peft.training.measure import MMAP_THRESHOLD, run_json_subprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    dims = SMOKE_DIMS if args.smoke else MLA_DIMS
    info = machine_info()
    rows = []
    for context in args.contexts:
        for config in CONFIGS:
            spec = dict(config=config, context=context, dims=dims, threads=args.threads)
            env = {
                "OMP_NUM_THREADS": str(args.threads),
                "OMP_WAIT_POLICY": "PASSIVE",
                "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            }
            rows.append(run_json_subprocess([os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env))
            print(json.dumps(rows[-1]), flush=True)

    def mib(x: float) -> str:
        return f"{x / 2**20:,.1f}"

    table = []
    for row in rows:
        ref = next(r for r in rows if r["context"] == row["context"] and r["config"] == "original")
        table.append(
            [
                row["context"],
                row["config"],
                "" if row["settings"] is None else f"{row['settings']['kv_rank']} / {row['settings']['rope_dims']}",
                row["values_per_token_layer"],
                f"{row['cache_bytes_per_token_layer']:,.0f}",
                f"{row['cache_bytes_per_token_layer'] / ref['cache_bytes_per_token_layer']:.3f}",
                mib(row["cache_bytes"]),
                mib(row["model_rss"]),
                mib(row["prefill_peak_rss"] - row["model_rss"]),
                f"{(row['prefill_peak_rss'] - row['model_rss']) / (ref['prefill_peak_rss'] - ref['model_rss']):.2f}",
                mib(row["decode_peak_rss"] - row["model_rss"]),
                f"{(row['decode_peak_rss'] - row['model_rss']) / (ref['decode_peak_rss'] - ref['model_rss']):.2f}",
                f"{row['prefill_s']:.1f}",
                f"{row['decode_ms_per_token']:.1f}",
                f"{row['decode_cpu_ms_per_token']:.1f}",
                f"{row['decode_cpu_ms_per_token'] / ref['decode_cpu_ms_per_token']:.2f}",
            ]
        )
    headers = [
        "T",
        "config",
        "kv_rank / rope_dims",
        "cached values / token / layer",
        "cache bytes / token / layer",
        "cache vs original",
        "cache MiB",
        "model RSS MiB",
        "prefill peak - model MiB",
        "vs original",
        "decode peak - model MiB",
        "vs original",
        "prefill s",
        "decode ms/token",
        "decode CPU ms/token",
        "decode CPU vs original",
    ]
    print()
    print(f"Machine: {machine_line(info)}; {args.threads} thread(s); model {dims}")
    print(markdown_table(headers, table))
    write_json(args.json_out, dict(machine=info, dims=dims, threads=args.threads, rows=rows, table=table))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
