"""A hand-written PyTorch training loop driven by hwoptim's AmpOptimWrapper.

What it shows, on whatever device ``device="auto"`` finds (CPU, CUDA, MPS, XPU, NPU, ...):

- gradient accumulation (``--accum``) with the right loss factor for a shorter last window;
- gradient clipping by total norm (``--clip``), with unscaling first when the loss is scaled;
- mixed precision in the device's autocast dtype (CPU: bfloat16, CUDA: float16 with dynamic
  loss scaling), or the one ``--dtype`` asks for;
- an lr schedule stepped once per optimizer update, not once per micro-batch;
- logging loss, grad norm, loss scale and skipped steps every ``--log-every`` micro-batches
  with no host-device sync on the other ones;
- checkpoints through ``state_dict()`` / ``load_state_dict()``, and a resume that continues
  exactly where the interrupted run would have gone.

Try:

    python examples/plain_loop.py                     # 200 micro-batches on the auto device
    python examples/plain_loop.py --dtype float16     # fp16 + dynamic loss scaling (CPU too)
    python examples/plain_loop.py --stop-after 90     # simulate a crash after 90 micro-batches
    python examples/plain_loop.py --resume            # ... and continue from the last checkpoint
"""
# smoke-args: --steps 6 --accum 2 --log-every 2
# smoke-expect: done: 6 micro-batches, 3 optimizer updates

from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch
from torch import nn

from hwoptim import AmpOptimWrapper, get_backend

FEATURES, CLASSES = 32, 10


def make_batch(step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch number ``step`` of a synthetic classification task (labels from a fixed
    random linear "teacher").

    A stand-in for a data loader whose order is fixed by the step number, which is what an
    exact resume needs (with a real loader: a seeded sampler, skipped ahead on resume).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    x = torch.randn(batch_size, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=g.manual_seed(seed))
    return x, (x @ teacher).argmax(dim=1)


def save_checkpoint(path: str, model: nn.Module, wrapper: AmpOptimWrapper, scheduler) -> None:
    # wrapper.state_dict() is the optimizer's state dict plus "hwoptim" and, when a loss
    # scaler is on, "loss_scaler"
    # (the accumulation counters), so the checkpoint knows where training stands.
    state = {"model": model.state_dict(), "optim": wrapper.state_dict(),
             "scheduler": scheduler.state_dict()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing never leaves a half-written checkpoint


def log_line(step: int, wrapper: AmpOptimWrapper, loss_sum: torch.Tensor, count: int) -> str:
    """One log line. The host syncs of the loop happen here, once per --log-every steps."""
    norm = wrapper.last_grad_norm    # total grad norm before clipping, last update (a tensor)
    scale = wrapper.loss_scale       # the current loss scale (a tensor); None when off
    skipped = wrapper.skipped_steps  # updates skipped for inf/nan gradients (a tensor)
    parts = [
        f"step {step:5d}",
        f"loss {loss_sum.item() / count:.4f}",
        f"lr {wrapper.get_lr()['lr'][0]:.2e}",  # plain Python floats: no sync
        "grad_norm " + ("-" if norm is None else f"{norm.item():.3f}"),
        "loss_scale " + ("-" if scale is None else f"{scale.item():g}"),
        "skipped " + ("-" if skipped is None else f"{int(skipped.item())}"),
    ]
    return "  ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="micro-batches in the whole run")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer update")
    parser.add_argument("--clip", type=float, default=1.0, help="max total grad norm")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, xpu, npu")
    parser.add_argument("--dtype", default=None,
                        help="float16, bfloat16 or float32 (default: the device's amp dtype)")
    parser.add_argument("--fused", action="store_true",
                        help="fused AdamW: fp16 loss scaling then needs no host sync per update")
    parser.add_argument("--log-every", type=int, default=20, help="micro-batches between logs")
    parser.add_argument("--save-every", type=int, default=5,
                        help="optimizer updates between checkpoints")
    parser.add_argument("--checkpoint",
                        default=os.path.join(tempfile.gettempdir(), "hwoptim_plain_loop.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many micro-batches, as if the job were killed")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(FEATURES, 128), nn.GELU(), nn.Linear(128, CLASSES))
    # The device is picked now (not at import). The model moves before the optimizer is
    # built: on NPUs and other out-of-tree devices .to() replaces the parameters, and the
    # optimizer must hold the new ones.
    device = get_backend(args.device).device()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                  fused=args.fused or None)

    # The wrapper decides everything up front: autocast dtype, whether a loss scaler is
    # needed (fp16 only), how to clip.
    wrapper = AmpOptimWrapper(optimizer, device=device, dtype=args.dtype,
                              accumulative_counts=args.accum, clip_grad=dict(max_norm=args.clip))
    print(f"device {device}  dtype {str(wrapper.cast_dtype).replace('torch.', '')}  "
          f"loss scaling {'on' if wrapper.loss_scaler is not None else 'off'}")

    # One lr step per optimizer update: the schedule length is the number of windows.
    num_updates = math.ceil(args.steps / args.accum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_updates)

    if args.resume and os.path.exists(args.checkpoint):
        checkpoint = torch.load(args.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        wrapper.load_state_dict(checkpoint["optim"])  # also restores the accumulation counters
        scheduler.load_state_dict(checkpoint["scheduler"])
        print(f"resumed from {args.checkpoint} at micro-batch {wrapper.inner_count}")
    else:
        if args.resume:
            print(f"no checkpoint at {args.checkpoint}: starting from the beginning")
        # Where training starts and how long it is: the last window may be shorter than
        # --accum, and the wrapper divides its loss by its real length.
        wrapper.initialize_count_status(model, init_counts=0, max_counts=args.steps)
    start = wrapper.inner_count

    loss_sum = torch.zeros((), device=device)  # summed on the device, read every N steps
    since_log = 0
    for step in range(start, args.steps):
        if args.stop_after is not None and step >= args.stop_after:
            print(f"stopped after {step} micro-batches (--stop-after); rerun with --resume")
            return
        x, y = make_batch(step, args.batch_size, args.seed)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        with wrapper.optim_context(model):  # autocast (+ DDP/FSDP no_sync while accumulating)
            loss = nn.functional.cross_entropy(model(x), y)
        wrapper.update_params(loss)  # scale, backward; at a window's end unscale, clip, step, zero

        loss_sum += loss.detach()  # a device op: no sync
        since_log += 1

        if wrapper.should_update():  # this micro-batch ended a window: an update happened
            # (or was skipped for inf/nan gradients; the schedule moves on either way)
            scheduler.step()
            updates_done = math.ceil(wrapper.inner_count / args.accum)
            # Checkpoint only at a window's end: the gradients of a half-accumulated window
            # are in no state dict.
            if updates_done % args.save_every == 0 or wrapper.inner_count == args.steps:
                save_checkpoint(args.checkpoint, model, wrapper, scheduler)

        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(log_line(step + 1, wrapper, loss_sum, since_log))
            loss_sum.zero_()
            since_log = 0

    # skipped: inf/nan updates skipped for real (the fp16 scaler, a fused optimizer);
    # zeroed: those a non-fused optimizer stepped with zeroed gradients (bf16/fp32 clipping)
    skipped, zeroed = wrapper.skipped_steps, wrapper.zeroed_steps
    print(f"done: {args.steps} micro-batches, {num_updates} optimizer updates, "
          f"{0 if skipped is None else int(skipped.item())} skipped, "
          f"{0 if zeroed is None else int(zeroed.item())} zeroed; "
          f"checkpoint {args.checkpoint}")


if __name__ == "__main__":
    main()
