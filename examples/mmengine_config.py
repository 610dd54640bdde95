"""Build the optimizer wrapper from an mmengine-style config dict with build_optim_wrapper.

The ``optim_wrapper`` dict below is written exactly as in an mmengine config file: wrapper
type, optimizer, clipping, accumulation and per-parameter settings (``paramwise_cfg``).
hwoptim builds the same parameter groups, in the same order, as mmengine's
DefaultOptimWrapperConstructor, so optimizer checkpoints move between the two.

When mmengine is installed, the script builds mmengine's wrapper from the same dict and
checks that both agree. (mmengine's AmpOptimWrapper only builds on CUDA/NPU/MLU/MUSA; on other
devices the comparison uses mmengine's plain OptimWrapper, which makes the same groups.)

    python examples/mmengine_config.py
    python examples/mmengine_config.py --device cpu --no-mmengine
"""
# smoke-args: --steps 4
# smoke-expect: parameter groups:
# smoke-expect: done: 4 micro-batches

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from hwoptim import build_optim_wrapper, get_backend

# -- the config, as it would appear in an mmengine config file ------------------------------
optim_wrapper = dict(
    type="AmpOptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0),
    accumulative_counts=2,
    paramwise_cfg=dict(
        norm_decay_mult=0.0,                           # no weight decay on norm layers
        bias_decay_mult=0.0,                           # ... nor on biases
        custom_keys={"backbone": dict(lr_mult=0.1)},   # a 10x smaller lr for the backbone
    ),
)
# As in mmengine, a matching custom key wins over the *_mult rules: the backbone's norm
# layers and biases get lr_mult=0.1 and keep the full weight decay.
# hwoptim-only keys (device, ...) can be added; without them, device="auto" is used and the
# dtype is the device's autocast dtype, which is also what mmengine does on its devices.


class Classifier(nn.Module):
    """A tiny image classifier with a backbone, a neck and a head, as mmengine models have."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.neck = nn.LayerNorm(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def describe_groups(wrapper) -> str:
    """How many parameter groups have each (lr, weight_decay), e.g. for a sanity check."""
    counts: dict[tuple[float, float], int] = {}
    for group in wrapper.param_groups:
        key = (group["lr"], group["weight_decay"])
        counts[key] = counts.get(key, 0) + len(group["params"])
    return ", ".join(f"{n} params lr={lr:g} wd={wd:g}" for (lr, wd), n in sorted(counts.items()))


def compare_with_mmengine(cfg: dict, ours) -> None:
    """Build mmengine's wrapper from the same dict; check the groups and the checkpoints."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mmengine's own import-time deprecation warnings
            from mmengine.logging import MMLogger
            from mmengine.optim import build_optim_wrapper as mm_build_optim_wrapper
    except ImportError:
        print("mmengine: not installed, comparison skipped (pip install mmengine)")
        return
    MMLogger.get_instance("example", log_level="WARNING")  # quiet: it logs each param's options

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler
            theirs = mm_build_optim_wrapper(Classifier(), cfg)
    except AssertionError as exc:  # "AmpOptimWrapper is only available training on gpu, ..."
        print(f"mmengine: its AmpOptimWrapper refuses this machine ({exc}); "
              "comparing with its OptimWrapper instead")
        theirs = mm_build_optim_wrapper(Classifier(), dict(cfg, type="OptimWrapper"))

    def groups(wrapper):  # the optimizer's groups without the parameter tensors
        return wrapper.optimizer.state_dict()["param_groups"]

    if groups(ours) != groups(theirs):
        raise SystemExit("mmengine: the parameter groups differ from hwoptim's")
    print(f"mmengine: {type(theirs).__name__} from the same dict has the same parameter "
          "groups, in the same order")

    # hwoptim's state dict keeps mmengine's layout (optimizer keys, "loss_scaler") plus an
    # "hwoptim" entry with the accumulation counters, which mmengine ignores.
    # Without a scaler (bf16/fp32) there is no "loss_scaler" entry: mmengine then keeps the
    # fresh scaler its AmpOptimWrapper always has.
    state = ours.state_dict()
    theirs.load_state_dict(state)
    ours_state = ours.optimizer.state_dict()["state"]
    theirs_state = theirs.optimizer.state_dict()["state"]
    same = ours_state.keys() == theirs_state.keys() and all(
        torch.equal(ours_state[i][k].cpu(), theirs_state[i][k].cpu())
        for i in ours_state for k in ours_state[i]
    )
    if not same:
        raise SystemExit("mmengine: the optimizer state differs after loading hwoptim's checkpoint")
    print("mmengine: loaded hwoptim's checkpoint; the optimizer state is identical")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="micro-batches to train")
    parser.add_argument("--device", default=None,
                        help="add device=... to the config (default: none, so auto)")
    parser.add_argument("--no-mmengine", action="store_true", help="skip the mmengine comparison")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = Classifier()
    cfg = optim_wrapper if args.device is None else dict(optim_wrapper, device=args.device)
    model.to(get_backend(cfg.get("device", "auto")).device())  # before the optimizer is built
    wrapper = build_optim_wrapper(model, cfg)  # never modifies cfg
    print(f"{type(wrapper).__name__} on {wrapper.device}, "
          f"dtype {str(wrapper.cast_dtype).replace('torch.', '')}")
    print(f"parameter groups: {describe_groups(wrapper)}")

    # Synthetic task: the class is which colour channel is brightest.
    wrapper.initialize_count_status(model, 0, args.steps)
    loss_sum = torch.zeros((), device=wrapper.device)
    for step in range(args.steps):
        x = torch.rand(16, 3, 8, 8)
        y = x.mean(dim=(2, 3)).argmax(dim=1)
        x, y = x.to(wrapper.device), y.to(wrapper.device)
        with wrapper.optim_context(model):
            loss = nn.functional.cross_entropy(model(x), y)
        wrapper.update_params(loss)
        loss_sum += loss.detach()
        if (step + 1) % 10 == 0:
            print(f"step {step + 1:3d}  loss {loss_sum.item() / 10:.4f}  "
                  f"grad_norm {wrapper.last_grad_norm.item():.3f}")
            loss_sum.zero_()

    if not args.no_mmengine:
        compare_with_mmengine(optim_wrapper, wrapper)
    print(f"done: {args.steps} micro-batches, inner_count {wrapper.inner_count}")


if __name__ == "__main__":
    main()
