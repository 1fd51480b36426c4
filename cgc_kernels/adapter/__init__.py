"""CGC-LoRA inside transformers models: config, gates, CGCLoRALinear, CGCModel, quantized bases,
the collator and gate inspection."""
