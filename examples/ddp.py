"""Data-parallel training with DDP and hwoptim: accumulation without needless all-reduces.

Run it on two processes of whatever this machine has (GPUs, NPUs, ... or the CPU)::

    torchrun --nproc-per-node 2 examples/ddp.py

Nothing in it names a device: the collective library (nccl, hccl, xccl, gloo) and the
device of each process come from hwoptim's backend, picked with ``device="auto"`` (set
``HWOPTIM_DEVICE=cpu`` to force the CPU and gloo). Each rank trains on its own synthetic
batches; with ``--accumulative-counts k`` the gradients of k micro-batches are summed
locally and all-reduced once, on the micro-batch that updates.
"""

# smoke-skip: tests/test_distributed.py   (needs two processes; run there in both ranks)

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hwoptim import AmpOptimWrapper, get_backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="micro-batches per rank")
    parser.add_argument("--accumulative-counts", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="autocast dtype (default: the device's)")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend = get_backend("auto")
    # torchrun sets LOCAL_RANK; one device per process where there are several, the
    # single device (the CPU) shared otherwise.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend.set_device(local_rank % max(backend.device_count(), 1))
    dist.init_process_group(backend.dist_backend)
    rank = dist.get_rank()
    device = backend.device()

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts them anyway)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    device_ids = None if device.index is None else [device.index]  # None on the CPU
    ddp = DistributedDataParallel(model, device_ids=device_ids)

    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        device=backend,
        dtype=args.dtype,
        accumulative_counts=args.accumulative_counts,
        clip_grad=dict(max_norm=1.0),
    )
    # max_counts lets the last, shorter window step with the right loss factor.
    wrapper.initialize_count_status(ddp, init_counts=0, max_counts=args.steps)

    teacher = (torch.randn(32, 1, generator=torch.Generator().manual_seed(1)) / 32**0.5).to(device)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    updates = 0
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, 32, generator=data).to(device)
        y = x @ teacher
        with wrapper.optim_context(ddp):  # autocast, and no_sync while accumulating
            loss = nn.functional.mse_loss(ddp(x).float(), y)
        wrapper.update_params(loss)  # backward; on the window's last micro-batch: step
        if wrapper.should_update():
            updates += 1
            if rank == 0 and updates % 5 == 0:
                # Reading tensors is a host sync: do it only when logging.
                print(f"update {updates}: loss {loss.item():.4f}, "
                      f"grad norm {wrapper.last_grad_norm.item():.4f}", flush=True)

    if rank == 0:
        print(f"done: {args.steps} micro-batches, {updates} updates on "
              f"{dist.get_world_size()} {backend.name} processes ({backend.dist_backend})",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
