"""Tokens per passkey answer (`" <5-digit key>"`) for the demo tokenizers of rounds 3, 4 and 4b of EXPERIMENTS.md.

python experiments/demo/key_tokens.py > experiments/demo/key_tokens.txt
"""

import random
import statistics
from dataclasses import replace

from pi_peft import demo
from pi_peft.evaluation.passkey import random_key

for split_digits, vocab_size in ((True, 1024), (False, 2048), (False, 1024)):
    cfg = replace(demo.DemoConfig(), vocab_size=vocab_size, split_digits=split_digits)
    tok = demo.prepare_data(cfg, random.Random(cfg.seed))["tokenizer"]
    keys = [random_key(random.Random(2)) for _ in range(1)] + [random_key(random.Random(i)) for i in range(1000)]
    n = [len(tok(" " + k)["input_ids"]) for k in keys[1:]]
    print(
        f"split_digits={split_digits} vocab_size={vocab_size}: tokens per key mean {statistics.mean(n):.2f},"
        f" min {min(n)}, max {max(n)}; e.g. {tok.tokenize(' ' + keys[0])}"
    )
