"""
Train a Position Interpolation (Q)LoRA adapter: the same code as `pi-peft train` (`pi_peft/train.py`).

```bash
python recipes/train.py --config recipes/llama2-7b-16k.yaml
python recipes/train.py --config recipes/llama2-7b-32k.yaml
python recipes/train.py --config recipes/llama3-8b-32k.yaml
python recipes/train.py --config recipes/mistral-7b-32k.yaml

# any option of the YAML can be overridden, e.g. resume after a crash:
python recipes/train.py --config recipes/llama2-7b-16k.yaml --resume_from_checkpoint true
```

Arguments: trl's `ScriptArguments` (dataset), `SFTConfig` (training; `max_length` defaults to the target context),
`ModelConfig` (model, `load_in_4bit`, LoRA) and pi_peft's `PIArguments` (PIConfig's own fields: `context_length`,
`rope_type`, `train_embeddings`, ...).
"""

from pi_peft.cli.train import parse_train_args
from pi_peft.training.sft import main

if __name__ == "__main__":
    main(*parse_train_args())
