"""Training: `pi-peft train` (trl's SFTTrainer with a PI adapter), its data and packing, memory savers, the memory
estimator and the CPU peak-memory measurement."""
