# Triton's interpreter must be chosen before any @triton.jit function is defined: kernels are
# tested on CPU tensors there (CI has no GPU). Set here, at the root, before any test imports.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
