"""Two optimizers with OptimWrapperDict: a small GAN learns a 1-D Gaussian.

The model has two submodules, ``generator`` and ``discriminator``. One config dict with an
entry per submodule name builds one wrapper per submodule (each with its own optimizer,
precision, loss scaler, clipping and accumulation), held together by an OptimWrapperDict.
Each wrapper is driven on its own; the dict gives per-name views (lr, grad norms, skipped
steps), initializes every wrapper's counters at once and checkpoints them together.

    python examples/gan.py
    python examples/gan.py --steps 1000 --dtype float16
"""
# smoke-args: --steps 4 --log-every 2
# smoke-expect: done: 4 iterations

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import torch
from torch import nn

from hwoptim import build_optim_wrapper, get_backend

REAL_MEAN, REAL_STD, NOISE = 3.0, 0.5, 8


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 1))
        self.discriminator = nn.Sequential(nn.Linear(1, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradients for ``module``'s parameters inside the block.

    The generator's loss goes through the discriminator; without this, that backward would
    add to the discriminator's gradients, which its wrapper accumulates for its own update.
    """
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps, xpu, npu, ...")
    parser.add_argument("--dtype", default=None, help="amp dtype (default: the device's)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint",
                        default=os.path.join(tempfile.gettempdir(), "hwoptim_gan.pt"))
    args = parser.parse_args(argv)

    # One entry per submodule name: build_optim_wrapper gives each wrapper the parameters of
    # model.<name> and returns an OptimWrapperDict. Per-name settings may differ.
    amp = dict(type="AmpOptimWrapper", device=args.device, dtype=args.dtype)
    cfg = dict(
        generator=dict(amp, optimizer=dict(type="Adam", lr=2e-3, betas=(0.5, 0.999))),
        discriminator=dict(amp, optimizer=dict(type="Adam", lr=2e-3, betas=(0.5, 0.999)),
                           clip_grad=dict(max_norm=1.0)),
    )
    torch.manual_seed(0)
    model = GAN()
    # To the device before the optimizers are built from its parameters (on out-of-tree
    # devices .to() replaces them).
    device = get_backend(args.device).device()
    model.to(device)
    wrappers = build_optim_wrapper(model, cfg)
    g_wrapper, d_wrapper = wrappers["generator"], wrappers["discriminator"]
    assert g_wrapper.device == d_wrapper.device == device
    print(f"{type(wrappers).__name__} {list(wrappers)} on {device}; lr {wrappers.get_lr()}")

    # Reaches every wrapper, each with its own submodule (mmengine's version does nothing).
    wrappers.initialize_count_status(model, 0, args.steps)

    bce = nn.functional.binary_cross_entropy_with_logits
    ones = torch.ones(args.batch_size, 1, device=device)
    zeros = torch.zeros(args.batch_size, 1, device=device)
    d_sum = torch.zeros((), device=device)  # summed on the device, read every N steps
    g_sum = torch.zeros((), device=device)
    for step in range(args.steps):
        real = REAL_MEAN + REAL_STD * torch.randn(args.batch_size, 1, device=device)
        noise = torch.randn(args.batch_size, NOISE, device=device)

        # 1) discriminator: tell real samples from (detached) generated ones.
        with d_wrapper.optim_context(model.discriminator):
            with torch.no_grad():
                fake = model.generator(noise)
            d_loss = bce(model.discriminator(real), ones) + bce(model.discriminator(fake), zeros)
        d_wrapper.update_params(d_loss)

        # 2) generator: make the discriminator call its samples real.
        with frozen(model.discriminator), g_wrapper.optim_context(model.generator):
            g_loss = bce(model.discriminator(model.generator(noise)), ones)
        g_wrapper.update_params(g_loss)

        d_sum += d_loss.detach()
        g_sum += g_loss.detach()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            with torch.no_grad():
                sample = model.generator(torch.randn(4096, NOISE, device=device)).float()
            d_norm = wrappers.last_grad_norm["discriminator"]  # a tensor, per name
            print(f"step {step + 1:5d}  d_loss {d_sum.item() / n:.3f}  "
                  f"g_loss {g_sum.item() / n:.3f}  d_grad_norm {d_norm.item():.3f}  "
                  f"fake mean {sample.mean().item():.2f} std {sample.std().item():.2f} "
                  f"(real {REAL_MEAN} / {REAL_STD})")
            d_sum.zero_()
            g_sum.zero_()

    # One state dict for both: {"generator": {...}, "discriminator": {...}}.
    torch.save({"model": model.state_dict(), "optim": wrappers.state_dict()}, args.checkpoint)
    restored = build_optim_wrapper(GAN(), cfg)
    restored.load_state_dict(torch.load(args.checkpoint, map_location=device, weights_only=True)["optim"])
    skipped = {name: 0 if count is None else int(count.item())
               for name, count in wrappers.skipped_steps.items()}
    print(f"done: {args.steps} iterations, inner counts {restored.inner_count} restored from "
          f"{args.checkpoint}; skipped steps {skipped}")


if __name__ == "__main__":
    main()
