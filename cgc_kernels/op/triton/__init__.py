"""Triton kernels of the CGC-LoRA op and their launchers (dispatched from `op.dispatch`)."""
