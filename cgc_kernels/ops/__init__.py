"""Triton kernels for CGC-LoRA and the dispatching op (`function.cgc_lora`)."""
