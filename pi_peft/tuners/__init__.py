"""pi_peft's peft methods, one folder each: `pi` (Position Interpolation + LoRA) and `mla` (MHA2MLA + PI)."""
