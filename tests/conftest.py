"""Session-wide test setup.

TRITON_INTERPRET=1 runs our Triton kernels on CPU tensors under Triton's interpreter. Triton
reads it when it is first imported, and several test modules import libraries that import
Triton (vLLM, transformers), so it is set here, before any test module is collected. On CPU
nothing else launches Triton kernels (vLLM's CPU backend disables Triton).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
