"""Test setup for the plugin distributions' own tests, when run from the repository root."""

import torch

# Tiny tensors: one intra-op thread is fastest, and on a busy CI runner more threads only
# wait for each other (see tests/conftest.py).
torch.set_num_threads(1)
