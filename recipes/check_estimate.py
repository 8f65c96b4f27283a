"""
Check `pi-peft estimate` against measured peaks: fp32 LoRA training steps of tiny Llama configs on CPU, peak RSS of a
fresh subprocess minus its RSS after the imports (`pi_peft.measure.measure_cpu_peak`), at several context lengths.

```bash
python recipes/check_estimate.py            # prints a markdown table
```
"""

from pi_peft.estimate import estimate_memory
from pi_peft.measure import measure_cpu_peak

CONFIGS = {
    "h128-L2-V2048": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
    "h256-L4-V4096": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512),
}  # fmt: skip
LENGTHS = (1024, 2048, 4096, 8192)
CHUNK = 1024


def main():
    print("| config | context | measured peak (MiB) | estimate (MiB) | estimate / measured |")
    print("|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        for length in LENGTHS:
            measured = measure_cpu_peak(config, length, r=8, chunk_tokens=CHUNK)
            estimate = estimate_memory(
                config, length, quantization="none", r=8, dtype_bytes=4, device="cpu", loss="chunked",
                loss_chunk_tokens=CHUNK,
            ).total  # fmt: skip
            print(
                f"| {name} | {length} | {measured / 2**20:.1f} | {estimate / 2**20:.1f} | {estimate / measured:.2f} |"
            )


if __name__ == "__main__":
    main()
