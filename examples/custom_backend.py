"""A backend of your own: the few lines that teach hwoptim a device, registered and used.

A real device backend lives in a package of its own and registers through the entry point
``hwoptim.backends``; see backends/hwoptim-hpu and backends/hwoptim-mlu for two complete
ones (with their mock stand-ins and tests) and docs/writing-a-backend.md for the guide.

This script shows the same mechanics in one file, runnable anywhere: it registers a
backend for the CPU that counts what the wrapper asks of it (autocast per micro-batch, the
grad scaler once), picks it with device="auto" through HWOPTIM_DEVICE, and trains with it.

    python examples/custom_backend.py --steps 40
"""

# smoke-args: --steps 8
# smoke-expect: backend: counting-cpu
# smoke-expect: done:

from __future__ import annotations

import argparse
import os
from collections import Counter
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from hwoptim import AmpOptimWrapper, register_backend
from hwoptim.backends.cpu import CpuBackend

CALLS: Counter[str] = Counter()


class CountingCpuBackend(CpuBackend):
    """The CPU, plus a record of what hwoptim asks of a backend.

    A device backend sets name, device_type, priority, dist_backend and its amp dtypes, and
    overrides only what differs on its device (often just grad_scaler, or nothing): the base
    class derives devices, counts, seeds and synchronisation from device_type.
    """

    name = "counting-cpu"
    supported_amp_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    default_dtype = torch.float16  # unlike the plain cpu backend: fp16, so a scaler is made

    def autocast(
        self, dtype: torch.dtype | None = None, enabled: bool = True, cache_enabled: bool | None = None
    ) -> AbstractContextManager[Any]:
        CALLS["autocast"] += 1
        return super().autocast(dtype, enabled, cache_enabled)

    def grad_scaler(self, sharded: bool = False, **kwargs: Any) -> torch.amp.GradScaler:
        CALLS["grad_scaler"] += 1
        return super().grad_scaler(sharded, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    register_backend(CountingCpuBackend, override=True)  # a package would use its entry point
    os.environ["HWOPTIM_DEVICE"] = CountingCpuBackend.name  # what device="auto" now picks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    wrapper = AmpOptimWrapper(torch.optim.AdamW(model.parameters(), lr=3e-3), device="auto",
                              accumulative_counts=2, clip_grad=dict(max_norm=1.0))
    print(f"backend: {wrapper.backend.name}, dtype {wrapper.cast_dtype}, "
          f"scaler {type(wrapper.loss_scaler).__name__}")
    wrapper.initialize_count_status(model, 0, args.steps)
    teacher = torch.randn(16, 1)
    first = last = None
    for step in range(args.steps):
        x = torch.randn(32, 16)
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x).float(), x @ teacher)
        wrapper.update_params(loss)
        if step == 0:
            first = loss.detach()
        last = loss.detach()
    assert first is not None and last is not None
    print(f"asked of the backend: {dict(CALLS)}")
    print(f"done: loss {float(first):.3f} -> {float(last):.3f} in {args.steps} micro-batches")


if __name__ == "__main__":
    main()
