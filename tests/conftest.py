import os
import sys

import torch
from hypothesis import settings

# Without a GPU, Triton kernels run in its interpreter; it must be on before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

# CI draws the same examples every run (reproducible landings); locally they vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
