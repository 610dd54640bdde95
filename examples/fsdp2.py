"""Sharded data-parallel training with FSDP2 (``fully_shard``) and hwoptim.

Run it on two processes of whatever this machine has (GPUs, NPUs, ... or the CPU)::

    torchrun --nproc-per-node 2 examples/fsdp2.py

What hwoptim does for FSDP2 here:

- accumulation really skips the reduce-scatter: FSDP2 reads its
  ``set_requires_gradient_sync`` flag during backward, so the wrapper keeps it off from
  the forward of a non-updating micro-batch until that micro-batch's backward has run;
- clipping uses the global norm over all shards (the gradients are DTensors), and
  ``last_grad_norm`` is a plain tensor with that value on every rank;
- with fp16 (``--dtype float16``), ``use_fsdp=True`` gives the backend's sharded loss
  scaler: the same scale, and the same skipped steps, on every rank;
- with ``--checkpoint DIR`` it saves a sharded checkpoint (torch.distributed.checkpoint:
  each rank writes its own shards, in the background) every ``--save-every`` micro-batches,
  inside a window too (``save_partial_grads=True``), and ``--resume`` continues from it,
  exactly: the resumed run ends with the parameters of a run that was never interrupted
  and saved at the same micro-batches (docs/checkpoints.md)::

    torchrun --nproc-per-node 2 examples/fsdp2.py --checkpoint /tmp/ck --stop-after 15
    torchrun --nproc-per-node 2 examples/fsdp2.py --checkpoint /tmp/ck --resume

The collective library and the device of each process come from hwoptim's backend
(``HWOPTIM_DEVICE=cpu`` forces the CPU and gloo).
"""

# smoke-skip: tests/test_distributed.py   (needs two processes; run there in both ranks)

from __future__ import annotations

import argparse
import os
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from hwoptim import AmpOptimWrapper, get_backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="micro-batches per rank")
    parser.add_argument("--accumulative-counts", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="autocast dtype (default: the device's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint", default=None, help="folder of the sharded checkpoint")
    parser.add_argument("--save-every", type=int, default=5, help="micro-batches between checkpoints")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (as if killed) after this micro-batch")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args(argv)
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint")
    return args


def digest(model: nn.Module) -> str:
    """A CRC-32 of all parameters, gathered (a collective: every rank calls it)."""
    full = [p.full_tensor() for p in model.parameters()]  # type: ignore[operator]
    return f"{zlib.crc32(torch.cat([t.detach().flatten().cpu() for t in full]).numpy().tobytes()):08x}"


def build_model(device: torch.device) -> nn.Module:
    """A small MLP, each block sharded on its own and the root over the rest."""
    torch.manual_seed(0)  # FSDP2 shards from the same initial weights on every rank
    blocks = [nn.Sequential(nn.Linear(n, 64), nn.GELU()) for n in (32, 64, 64)]
    model = nn.Sequential(*blocks, nn.Linear(64, 1)).to(device)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


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

    model = build_model(device)
    # The optimizer must see the sharded (DTensor) parameters: build it after fully_shard.
    wrapper = AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        device=backend,
        dtype=args.dtype,
        use_fsdp=True,
        accumulative_counts=args.accumulative_counts,
        clip_grad=dict(max_norm=1.0),
        save_partial_grads=True,  # a checkpoint inside a window keeps the window
    )
    start = 0
    if args.resume:
        # Every rank loads its shards; any number of ranks for a checkpoint at a window's end.
        wrapper.load_sharded(args.checkpoint, model)
        start = wrapper.inner_count
        if rank == 0:
            print(f"resumed from {args.checkpoint} at micro-batch {start}", flush=True)
    wrapper.initialize_count_status(model, init_counts=start, max_counts=args.steps)

    teacher = (torch.randn(32, 1, generator=torch.Generator().manual_seed(1)) / 32**0.5).to(device)
    updates = start // args.accumulative_counts
    saving = None
    for step in range(start, args.steps):
        data = torch.Generator().manual_seed(100_000 * step + rank)  # each rank its own batches
        x = torch.randn(args.batch_size, 32, generator=data).to(device)
        y = x @ teacher
        with wrapper.optim_context(model):  # autocast; sync off while accumulating
            loss = nn.functional.mse_loss(model(x).float(), y)
        wrapper.update_params(loss)  # the sync stays off until this backward has run
        if wrapper.should_update():
            updates += 1
            if rank == 0 and updates % 5 == 0:
                # Reading tensors is a host sync: do it only when logging.
                print(f"update {updates}: loss {loss.item():.4f}, "
                      f"global grad norm {wrapper.last_grad_norm.item():.4f}", flush=True)
        if args.checkpoint and (step + 1) % args.save_every == 0:
            if saving is not None:
                saving.result()  # one save in flight at a time
            # Copies the state to the host now, writes it in the background.
            saving = wrapper.save_sharded(args.checkpoint, model, async_save=True)
        if args.stop_after is not None and step + 1 == args.stop_after:
            break
    if saving is not None:
        saving.result()
    final = digest(model)

    if rank == 0:
        if args.stop_after is not None:
            print(f"stopped after micro-batch {args.stop_after}", flush=True)
        print(f"parameters digest {final}", flush=True)
        print(f"done: {args.steps} micro-batches, {updates} updates on "
              f"{dist.get_world_size()} {backend.name} processes ({backend.dist_backend})",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
