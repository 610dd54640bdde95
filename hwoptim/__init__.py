"""hwoptim: one optimizer wrapper for PyTorch training loops that behaves the same on every
accelerator -- gradient accumulation, clipping, mixed precision and gradient-sync skipping,
with the hardware picked at run time.

    from hwoptim import AmpOptimWrapper
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters()), device="auto",
                              accumulative_counts=4, clip_grad=dict(max_norm=1.0))
"""

from hwoptim import _extensions
from hwoptim.amp import AmpOptimWrapper
from hwoptim.backends.base import Backend
from hwoptim.backends.registry import get_backend, list_backends, register_backend
from hwoptim.build import build_optim_wrapper
from hwoptim.wrapper import OptimWrapper
from hwoptim.wrapper_dict import OptimWrapperDict

__version__ = "0.1.0"

# mmengine's Runner is joined through hwoptim.mmengine, imported once a wrapper is made
# while mmengine is imported (no custom_imports needed); the core never imports it
_extensions.declare(
    "mmengine",
    "hwoptim.mmengine",
    "Runner",
    'install what it needs with pip install "hwoptim[mmengine]"',
)

__all__ = [
    "AmpOptimWrapper",
    "Backend",
    "OptimWrapper",
    "OptimWrapperDict",
    "__version__",
    "build_optim_wrapper",
    "get_backend",
    "list_backends",
    "register_backend",
]
