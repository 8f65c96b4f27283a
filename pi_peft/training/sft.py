"""
Fine-tune a Position Interpolation (Q)LoRA adapter with trl's `SFTTrainer`: `pi-peft train` and `recipes/train.py`.

# Llama-2-7B 4k -> 16k, QLoRA on one 24 GB GPU
```bash
pi-peft train --config recipes/llama2-7b-16k.yaml
# same code: python recipes/train.py --config recipes/llama2-7b-16k.yaml
```

# Anything from the command line (every SFTConfig / ModelConfig option works)
```bash
pi-peft train \
    --model_name_or_path meta-llama/Llama-2-7b-hf \
    --dataset_name emozilla/pg19 --dataset_streaming \
    --context_length 16384 \
    --load_in_4bit \
    --lora_r 16 --lora_alpha 32 \
    --learning_rate 2e-5 --warmup_steps 20 --max_steps 1000 \
    --output_dir llama2-7b-16k-pi
```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainerCallback
from trl import ModelConfig, ScriptArguments, SFTConfig

from ..integrations import retry_deferred
from ..sharing.loading import check_model_path
from ..utils import refuse_to_overwrite_inputs

logger = logging.getLogger("pi_peft.training.sft")


# PIConfig's own fields that are not command-line options (filled in when the adapter is applied)
_NOT_OPTIONS = ("base_rope_parameters",)
# `pi-peft train` defaults that differ from PIConfig's: LongLoRA's trainable embeddings and norms
_TRAIN_DEFAULTS = {"train_embeddings": True, "train_norms": True}


def pi_config_fields() -> list[dataclasses.Field]:
    """The fields PIConfig adds to peft's LoraConfig (context window, RoPE type and keys, LongLoRA, S2-Attn, ...)."""
    from peft import LoraConfig

    from ..tuners.pi.config import PIConfig

    lora = {f.name for f in dataclasses.fields(LoraConfig)}
    return [f for f in dataclasses.fields(PIConfig) if f.name not in lora and f.name not in _NOT_OPTIONS]


def _make_pi_arguments() -> type:
    """`PIArguments`: derived from PIConfig's own fields (so every PIConfig option is a `pi-peft train` flag), plus
    the data options. LoRA options come from trl's `ModelConfig` (`--lora_r`, ...)."""
    fields = []
    for f in pi_config_fields():
        default = _TRAIN_DEFAULTS.get(f.name, f.default)
        fields.append((f.name, f.type, dataclasses.field(default=default, metadata=dict(f.metadata))))
    fields += [
        (
            "data_files",
            Optional[list[str]],
            dataclasses.field(default=None, metadata={"help": "Local text/JSON(L)/parquet files."}),
        ),
        (
            "data_mode",
            str,
            dataclasses.field(
                default="auto",
                metadata={"help": "pretrain (pack documents into full windows), sft, or auto (by columns)."},
            ),
        ),
    ]
    cls = dataclasses.make_dataclass("PIArguments", fields)
    cls.__module__ = __name__
    cls.__doc__ = "pi_peft's options of `pi-peft train`: PIConfig's own fields (LongLoRA defaults on) + data options."
    return cls


PIArguments = _make_pi_arguments()


@dataclass
class PITrainingConfig(SFTConfig):
    """trl's `SFTConfig` with long-context defaults: `max_length` = the target context, non-reentrant checkpointing."""

    max_length: Optional[int] = field(
        default=None, metadata={"help": "Tokens per training sequence; defaults to the target `context_length`."}
    )
    activation_checkpointing: Optional[bool] = field(
        default=True, metadata={"help": "Recompute activations in backward (transformers' current name; on)."}
    )
    activation_checkpointing_kwargs: Optional[dict] = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Keyword arguments for gradient checkpointing (non-reentrant by default)."},
    )
    warmup_steps: float = field(default=20, metadata={"help": "Linear warm-up steps (PI paper / LongLoRA: 20)."})
    report_to: Optional[str] = field(default="none", metadata={"help": "Loggers (wandb, tensorboard, none)."})
    tiled_mlp: bool = field(
        default=False,
        metadata={"help": "Run every decoder layer's MLP over sequence tiles with its own recompute: saves the "
                  "MLP's `tokens x intermediate` activations; same loss and gradients as untiled with `lora_dropout` "
                  "0 (with dropout, other random masks). Undone when training ends. See "
                  "pi_peft.ops.tiled_mlp.apply_tiled_mlp."},
    )  # fmt: skip
    tile_tokens: Optional[int] = field(
        default=None, metadata={"help": "Tokens per MLP tile with `tiled_mlp` (default: automatic, ~hidden size)."}
    )


@dataclass
class PIModelConfig(ModelConfig):
    """trl's `ModelConfig` with QLoRA defaults: NF4 with double quantisation, bf16, LoRA on all linear layers."""

    dtype: Optional[str] = field(default="bfloat16", metadata={"help": "Weights / 4-bit compute dtype."})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "Double quantisation of the 4-bit absmax."})
    lora_target_modules: Optional[list[str]] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA targets (default: all linear layers)."}
    )


class PIProgressCallback(TrainerCallback):
    """Adds `context_length`, `pi_factor` and `tokens_per_second` (tokens trained since the last log / wall time since
    the last log) to every training log line, and prints the PI settings when training starts.

    Tokens come from trl's `num_tokens` when the log has it (a count of this trainer's own tokens: it starts at 0 in
    every process, a resumed one included), else from the steps done since the last log x `tokens_per_step`. Each
    rate compares two counts of the same kind, so a resume never makes it negative."""

    def __init__(self, context_length: int, pi_factor: float, original_context_length: int, tokens_per_step: int):
        self.context_length = context_length
        self.pi_factor = pi_factor
        self.original_context_length = original_context_length
        self.tokens_per_step = tokens_per_step
        self._last_time: Optional[float] = None
        self._last_step = 0
        self._last_num_tokens = 0.0  # trl's counter at the last log (0 when its trainer was made)

    def on_train_begin(self, args, state, control, **kwargs):
        logger.warning(
            "PI: training a %d-token window (%.4gx the original %d tokens)",
            self.context_length,
            self.pi_factor,
            self.original_context_length,
        )
        self._last_time, self._last_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        if "num_tokens" in logs:
            tokens = float(logs["num_tokens"]) - self._last_num_tokens
            self._last_num_tokens = float(logs["num_tokens"])
        else:
            tokens = float((state.global_step - self._last_step) * self.tokens_per_step)
        extra = {"context_length": self.context_length, "pi_factor": self.pi_factor}
        if self._last_time is not None and now > self._last_time and tokens >= 0:
            extra["tokens_per_second"] = round(tokens / (now - self._last_time), 2)
        self._last_time, self._last_step = now, state.global_step
        logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)


def make_pi_config(model_args: ModelConfig, pi_args: PIArguments, base_config):
    """The `PIConfig` of a run: PI settings + LoRA options of `model_args`, resolved against the base config."""
    from ..tuners.pi.config import PIConfig

    targets = model_args.lora_target_modules
    if targets is not None and list(targets) == ["all-linear"]:
        targets = "all-linear"
    config = PIConfig(
        **{f.name: getattr(pi_args, f.name) for f in pi_config_fields()},
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )
    return config.resolve_context(base_config.max_position_embeddings)


def quantization_config(model_args: ModelConfig):
    """trl's `get_quantization_config` (NF4 4-bit, double quantisation, compute in `model_args.dtype`) when
    `load_in_4bit`, else `None`; with pi_peft's two guards: no 8-bit, and 4-bit computes in bfloat16."""
    from trl import get_quantization_config

    if model_args.load_in_8bit:
        raise ValueError("`load_in_8bit` is not supported; use `load_in_4bit` (QLoRA NF4) or neither.")
    if model_args.load_in_4bit and model_args.dtype not in (None, "bfloat16"):
        raise ValueError(
            f"`dtype`={model_args.dtype!r} with `load_in_4bit`: QLoRA computes in bfloat16 (trl casts the trainable "
            "weights of a 4-bit model to bfloat16), so set `dtype` to 'bfloat16' or drop `load_in_4bit`."
        )
    if model_args.load_in_4bit and model_args.dtype is None:
        model_args.dtype = "bfloat16"
    return get_quantization_config(model_args)


def on_cpu_device(training_args) -> bool:
    """The run trains on CPU (`use_cpu`, or no GPU)."""
    return bool(training_args.use_cpu) or not torch.cuda.is_available()


def training_attention(model_args: ModelConfig, training_args: SFTConfig) -> str:
    """The attention implementation a run loads its model with: `attn_implementation` when given, else SDPA
    (FlashAttention 2 on a GPU with `flash-attn`; see :func:`pi_peft.training.memory.attn_implementation`)."""
    from .memory import attn_implementation

    return model_args.attn_implementation or attn_implementation("cpu" if on_cpu_device(training_args) else "cuda")


def load_training_model(model_args: ModelConfig, training_args: SFTConfig):
    """The base causal LM for training, through the one loader (:func:`pi_peft.sharing.loading.load_base_model`):
    4-bit NF4 when asked, SDPA / FlashAttention 2, bitsandbytes CPU fix applied."""
    from ..ops.bnb import fix_bnb_cpu_repack
    from ..sharing.loading import load_base_model

    on_cpu = on_cpu_device(training_args)
    quant = quantization_config(model_args)
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=training_attention(model_args, training_args),
    )
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": "cpu" if on_cpu else torch.cuda.current_device()})
    model = load_base_model(model_args.model_name_or_path, dtype=model_args.dtype, **kwargs)
    fix_bnb_cpu_repack(model)
    return model


TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")
"""The Trainer's torch-saved files of a checkpoint (with `rng_state*.pth`): zip archives when complete."""
CHECKPOINT_ONLY = ("trainer_state.json", "training_args.bin", *TRAINER_FILES)
"""Files of a checkpoint that are not part of the saved model (with `rng_state*.pth`)."""


def _trainer_state(path: str) -> dict:
    """`trainer_state.json` of checkpoint `path` as a dict (ValueError naming the file when it does not parse)."""
    file = os.path.join(path, "trainer_state.json")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file!r} cannot be read ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{file!r} has no integer `global_step`")
    return state


def checkpoint_problem(path: str) -> Optional[str]:
    """Why `path` is not a complete checkpoint (`None` when it is): every file a resume reads must parse. The
    adapter (`adapter_config.json`, `adapter_model.safetensors`: header and size), `trainer_state.json` (the Trainer
    writes it last) and every optimizer / scheduler / RNG file present (complete zip archives)."""
    import zipfile

    from ..sharing.loading import check_adapter_dir

    if not os.path.isdir(path):
        return "not a folder"
    try:
        check_adapter_dir(path)
        _trainer_state(path)
    except ValueError as exc:
        return str(exc)
    for name in sorted(os.listdir(path)):
        torch_saved = name in TRAINER_FILES or name.startswith("rng_state")
        if torch_saved and not zipfile.is_zipfile(os.path.join(path, name)):
            return f"`{name}` is truncated (not a complete torch archive)"
    return None


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint the Trainer finished writing, every file of it readable (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(path) is None


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest `checkpoint-N` in `output_dir` that was completely written (a kill mid-save leaves a partial one)."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(name.split("-")[-1]), name)
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and name.split("-")[-1].isdigit()
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume(resume_from_checkpoint, output_dir: str) -> Optional[str]:
    """`true`/`last` -> the newest complete checkpoint (or a fresh start when there is none); a path -> itself."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "last", "latest"):
        return last_complete_checkpoint(output_dir)
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem is not None:
        raise ValueError(
            f"`resume_from_checkpoint`={resume_from_checkpoint!r} is not a complete checkpoint directory ({problem}); "
            "pass `true` to resume from the newest complete one."
        )
    return resume_from_checkpoint


def has_final_adapter(output_dir: str) -> bool:
    """`output_dir` holds a complete final adapter (what :func:`save_adapter` writes, `adapter_config.json` last)."""
    from ..sharing.loading import check_adapter_dir

    try:
        check_adapter_dir(output_dir)
    except ValueError:
        return False
    return True


def earlier_run(output_dir: str) -> str:
    """What an earlier `pi-peft train` left in `output_dir` (its final adapter, its checkpoints), `""` if nothing."""
    if not os.path.isdir(output_dir):
        return ""
    steps = sorted(
        int(n.split("-")[-1]) for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[11:].isdigit()
    )
    found = ["a final adapter"] if has_final_adapter(output_dir) else []
    if steps:
        found.append(f"checkpoints at steps {', '.join(map(str, steps))}")
    return " and ".join(found)


def finished_at(checkpoint: str, training_args) -> Optional[int]:
    """The step of `checkpoint` when it ends the run `training_args` asks for (`max_steps`, or the checkpoint's own
    step count when training by epochs with unchanged `num_train_epochs`); `None` when steps are left to train."""
    state = _trainer_state(checkpoint)
    target = training_args.max_steps
    if target is None or target <= 0:
        if state.get("num_train_epochs") != training_args.num_train_epochs or not state.get("max_steps"):
            return None
        target = state["max_steps"]
    return state["global_step"] if state["global_step"] >= target else None


FINAL_TMP = ".tmp-final-save"
"""The temporary folder of the final save in `output_dir`: one name on every rank (each writes its share there, the
main process moves it in); every `.tmp-final-*` left by a killed process is removed after a save."""


def save_adapter(trainer, output_dir: str) -> None:
    """Save the final adapter (+ tokenizer) into `output_dir`, complete or absent: written to a temporary directory
    first, then moved in, `adapter_config.json` last. Safetensors only: the Trainer's pickled `training_args.bin`
    is replaced by `training_args.json` (tokens masked by transformers).

    Under several processes every rank calls the Trainer's `save_model` (ZeRO-3 and FSDP gather the weights with
    collectives), the main process alone writes and moves the files, and no rank returns before the move is done."""
    accelerator = trainer.accelerator
    tmp = os.path.join(output_dir, FINAL_TMP)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _move_in(tmp, output_dir, trainer.args)
    accelerator.wait_for_everyone()


def wait_for_everyone() -> None:
    """A barrier of every process when a process group is up (several processes), else nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_adapter_from_checkpoint(checkpoint: str, output_dir: str, training_args) -> None:
    """The final adapter of a run whose last checkpoint is `checkpoint` (a crash came between it and the final save):
    its model files, byte for byte (the Trainer saved the same model there), moved in as :func:`save_adapter` does."""
    if training_args.process_index == 0:
        tmp = os.path.join(output_dir, FINAL_TMP)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in os.listdir(checkpoint):
            source = os.path.join(checkpoint, name)
            if name not in CHECKPOINT_ONLY and not name.startswith("rng_state") and os.path.isfile(source):
                shutil.copy2(source, os.path.join(tmp, name))
        _move_in(tmp, output_dir, training_args)
    wait_for_everyone()  # no rank ends before the adapter is in place


def _move_in(tmp: str, output_dir: str, training_args) -> None:
    pickled = os.path.join(tmp, "training_args.bin")
    if os.path.exists(pickled):
        os.remove(pickled)
    with open(os.path.join(tmp, "training_args.json"), "w", encoding="utf-8") as f:
        f.write(training_args.to_json_string())
    names = sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json")
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    for name in os.listdir(output_dir):  # this one, and any left by a process killed while saving
        if name.startswith(".tmp-final-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def training_window(max_length: Optional[int], context_length: int) -> int:
    """Tokens per training sequence: the target context unless `max_length` says otherwise (never trl's 1024)."""
    if max_length is None:
        return context_length
    if max_length > context_length:
        raise ValueError(
            f"`max_length`={max_length} is longer than the extended window `context_length`={context_length}: "
            "positions past it were never interpolated. Raise `context_length` or lower `max_length`."
        )
    if max_length < context_length:
        logger.warning("`max_length`=%d trains shorter sequences than the %d-token target", max_length, context_length)
    return max_length


def finish_or_refuse(checkpoint: Optional[str], training_args) -> bool:
    """Whether `pi-peft train` should train, when asked to resume (`checkpoint`: the resolved one, or `None`).

    A run whose `checkpoint` is already at its last step is not trained again: its final adapter is left as it is
    (or, after a crash between that checkpoint and the final save, written from the checkpoint) and this returns
    `False`. A resume with no checkpoint into an `output_dir` that holds a final adapter is refused (it would train
    from scratch over it), and so is a run without `resume_from_checkpoint` into an `output_dir` that holds an earlier
    run (final adapter or checkpoints): it would overwrite it and mix the two runs' checkpoints."""
    output_dir = training_args.output_dir
    if checkpoint is None:
        asked = training_args.resume_from_checkpoint not in (None, False, "", "false", "False")
        earlier = earlier_run(output_dir)
        if not asked and earlier:
            raise ValueError(
                f"`output_dir`={output_dir!r} already holds a run ({earlier}); training from scratch into it would "
                "overwrite that run and mix its checkpoints with the new ones. Pass `--resume_from_checkpoint true` "
                "to continue (or finish) it, or choose a new `output_dir` (remove the folder to start over)."
            )
        if asked and has_final_adapter(output_dir):
            raise ValueError(
                f"`resume_from_checkpoint`={training_args.resume_from_checkpoint!r}: `output_dir`={output_dir!r} "
                "holds a finished adapter and no complete checkpoint to resume from, so a resume would train from "
                "scratch over it. Choose a new `output_dir`, or move the adapter away to train again."
            )
        return True
    step = finished_at(checkpoint, training_args)
    if step is None:
        return True
    finished = has_final_adapter(output_dir)
    wait_for_everyone()  # every rank has looked before the main process writes the adapter in
    if finished:
        logger.warning(
            "Nothing to resume: %s is at step %d, the last step of this run, and the finished adapter in %s is left "
            "as it is. Raise `max_steps` to train further.",
            checkpoint,
            step,
            output_dir,
        )
    else:
        save_adapter_from_checkpoint(checkpoint, output_dir, training_args)
        logger.warning(
            "Nothing to resume: %s is at step %d, the last step of this run; its adapter was saved to %s (no step "
            "trained).",
            checkpoint,
            step,
            output_dir,
        )
    return False


def main(
    script_args: ScriptArguments,
    training_args: PITrainingConfig,
    model_args: PIModelConfig,
    pi_args,
    callbacks: Optional[list] = None,
):
    """Load the data and the (4-bit) base, train a PI adapter with `SFTTrainer`, save it (and push it); returns the
    trainer, or `None` when a resume found the run already finished (see :func:`finish_or_refuse`). `callbacks`: extra
    `TrainerCallback`s for the trainer.

    Under several processes (`torchrun`, `accelerate launch`) a launch that would not be distributed is refused
    before the model loads, the engine accelerate built is checked against the one asked for, and the RoPE
    frequencies are checked equal on every rank before the first step (:mod:`pi_peft.training.distributed`)."""
    from transformers import AutoConfig, AutoTokenizer
    from trl import SFTTrainer

    from .data import load_raw_dataset, prepare_train_dataset
    from .distributed import check_engine, check_launch, check_rope_across_ranks

    check_launch(training_args, model_args)  # before anything starts a process group or loads a model
    if not training_args.should_log:
        logging.getLogger("pi_peft").setLevel(logging.ERROR)  # replicas: warnings once, from the main process

    refuse_to_overwrite_inputs(
        training_args.output_dir,
        {"model": model_args.model_name_or_path, **{f"data file {f}": f for f in pi_args.data_files or []}},
        field="output_dir",
        replaces_folder=False,
    )

    # Resume: the newest complete checkpoint; a run that already reached its last step is not trained again
    checkpoint = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if not finish_or_refuse(checkpoint, training_args):
        return None

    # PI settings, resolved against the base model's window
    check_model_path(model_args.model_name_or_path, "model_name_or_path")
    base_config = AutoConfig.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    peft_config = make_pi_config(model_args, pi_args, base_config)
    training_args.max_length = training_window(training_args.max_length, peft_config.context_length)

    # Data: documents packed into full windows, or SFT data passed to trl
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    dataset = load_raw_dataset(
        script_args.dataset_name,
        data_files=pi_args.data_files,
        config=script_args.dataset_config,
        split=script_args.dataset_train_split,
        streaming=script_args.dataset_streaming,
    )
    train_dataset, mode = prepare_train_dataset(
        dataset,
        tokenizer,
        training_args.max_length,
        mode=pi_args.data_mode,
        text_field=training_args.dataset_text_field,
    )
    if mode == "pretrain":
        training_args.packing = False  # already packed into exact windows

    # Ulysses sequence parallelism (`parallelism_config` or accelerate's PARALLELISM_CONFIG_* environment): refused
    # before the model loads where it would be wrong (heads, lengths, ZeRO stage, attention, S²-Attn, packing)
    from .sequence_parallel import check_training_sequence_parallel

    attn = training_attention(model_args, training_args)
    check_training_sequence_parallel(training_args, base_config, peft_config, mode, attn)

    # Model (4-bit NF4 when asked) and trainer; SFTTrainer applies the PIConfig and its fused chunked loss
    from .memory import offloading_for_device

    offloading_for_device(training_args, on_cpu_device(training_args))
    model = load_training_model(model_args, training_args)
    if training_args.tiled_mlp or training_args.tile_tokens is not None:
        from .memory import apply_memory_savers

        # tiling only: SFTTrainer turns on checkpointing itself
        tiling = dict(tiled_mlp=training_args.tiled_mlp, tile_tokens=training_args.tile_tokens)
        apply_memory_savers(model, gradient_checkpointing=False, **tiling)
    progress = PIProgressCallback(
        peft_config.context_length,
        peft_config.scaling_factor,
        peft_config.original_context_length,
        training_args.max_length
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.callback_handler.callbacks.insert(0, progress)  # before the printers, so they show its fields
    check_engine(trainer)
    check_rope_across_ranks(trainer.model)  # PI on every rank, before any step

    # Train (resuming from the newest complete checkpoint when asked), save, push
    trainer.train(resume_from_checkpoint=checkpoint)
    save_adapter(trainer, training_args.output_dir)
    trainer.accelerator.print(f"Adapter saved to {training_args.output_dir}.")
    from .memory import remove_memory_savers

    remove_memory_savers(trainer.model)  # tiled MLPs and checkpointing are for training only
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # as trl's sft.py: finish the trackers and the process group
    return trainer


retry_deferred()  # registration deferred by a first `import peft` from this module runs now
