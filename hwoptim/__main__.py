"""``python -m hwoptim env | demo``: what hwoptim sees on this machine, and a first training run.

``env`` prints every registered backend (built-in or plugin), whether it is available and
why not, its devices, amp dtypes and collective library, with the versions that matter in
a bug report (``--json`` for machines). ``demo`` trains a small synthetic model with
``device="auto"``, gradient accumulation, clipping and the device's amp dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch


def environment_report() -> dict[str, Any]:
    """Everything ``env`` prints, as plain data."""
    import hwoptim
    from hwoptim.backends import registry
    from hwoptim.backends.generic import generic_backend_for

    classes = [(c, registry.backend_origin(n)) for n, c in registry.list_backends().items()]
    accelerator = registry.current_accelerator()
    generic = None if accelerator is None else generic_backend_for(accelerator)
    if generic is not None:  # torch's accelerator, which no backend claims
        classes.insert(0, (generic, "generic (torch.accelerator)"))
    backends = []
    for cls, origin in classes:
        try:
            backend = cls()
            registry.is_available(backend)  # one whose check raises is reported by name
            facts = backend.describe()
        except (Exception, SystemExit) as exc:  # a report must never fail on one bad backend
            facts = {"name": cls.name, "available": False, "reason": f"describe() failed: {exc!r}"}
        facts["origin"] = origin
        backends.append(facts)
    try:
        auto: str | None = registry.get_backend("auto").name
        auto_error = None
    except Exception as exc:
        auto, auto_error = None, str(exc)
    return {
        "hwoptim": hwoptim.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "current_accelerator": accelerator,
        "auto": auto,
        "auto_error": auto_error,
        "env_override": os.environ.get(registry.ENV_VAR) or None,
        "backends": backends,
        "plugin_errors": [{"entry_point": n, "error": e} for n, e in registry.plugin_errors()],
    }


def _format_report(report: dict[str, Any]) -> str:
    lines = [
        f"hwoptim {report['hwoptim']}  torch {report['torch']}  python {report['python']}",
        f"platform: {report['platform']}",
        f"torch accelerator: {report['current_accelerator'] or 'none'}"
        + (f"  (cuda {report['torch_cuda']})" if report["torch_cuda"] else "")
        + (f"  (rocm {report['torch_hip']})" if report["torch_hip"] else ""),
        f"device='auto' picks: {report['auto'] or 'nothing: ' + str(report['auto_error'])}"
        + (f"  (from HWOPTIM_DEVICE={report['env_override']})" if report["env_override"] else ""),
        "",
    ]
    header = ("backend", "available", "devices", "amp dtypes (default first)", "dist", "from")
    rows = []
    for b in report["backends"]:
        dtypes = b.get("amp_dtypes", [])
        default = b.get("default_dtype")
        ordered = ([default] if default in dtypes else []) + [d for d in dtypes if d != default]
        devices = b.get("devices") or []
        rows.append((
            b["name"],
            "yes" if b.get("available") else "no",
            f"{b.get('device_count', 0)}" + (f" ({', '.join(sorted(set(devices)))})" if devices else ""),
            ", ".join(ordered),
            b.get("dist_backend", "?"),
            b.get("origin", "?"),
        ))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    why = [(b["name"], b["reason"]) for b in report["backends"] if not b.get("available")]
    if why:
        lines += ["", "not available:"] + [f"  {n}: {r}" for n, r in why]
    builds = [(b["name"], b["build"]) for b in report["backends"] if b.get("build")]
    if builds:
        lines += ["", "torch builds:"] + [f"  {n}: {build}" for n, build in builds]
    versions = [(b["name"], b.get("versions") or {}) for b in report["backends"]]
    if any(v for _, v in versions):
        lines += ["", "versions:"] + [
            f"  {n}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for n, vs in versions if vs
        ]
    if report["plugin_errors"]:
        lines += ["", "plugins that failed to load:"] + [
            f"  {p['entry_point']}: {p['error']}" for p in report["plugin_errors"]
        ]
    return "\n".join(lines)


def _cmd_env(args: argparse.Namespace) -> int:
    report = environment_report()
    print(json.dumps(report, indent=2, default=str) if args.json else _format_report(report))
    return 0


# -- demo -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stdout)


def run_demo(
    device: str = "auto", dtype: str | None = None, steps: int = 60, accum: int = 4,
    clip: float = 1.0, seed: int = 0, lr: float = 3e-3, batch_size: int = 64,
    plot: str | None = None, progress: bool = True, log_every: int = 10,
) -> dict[str, Any]:
    """Train a small MLP on synthetic regression data; return the summary ``demo`` prints."""
    from hwoptim import AmpOptimWrapper, get_backend
    from hwoptim.backends.base import dtype_name

    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    inputs = torch.randn(steps, batch_size, 32)
    with torch.no_grad():
        targets = teacher(inputs) + 0.01 * torch.randn(steps, batch_size, 1)

    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
        torch.nn.Linear(128, 1),
    )
    # The model goes to the device before the optimizer is built: on many devices .to()
    # replaces the parameters, and the optimizer must hold the new ones.
    backend = get_backend(device)
    model.to(backend.device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    wrapper = AmpOptimWrapper(
        optimizer, device=backend, dtype=dtype, accumulative_counts=accum,
        clip_grad=dict(max_norm=clip) if clip > 0 else None,
    )
    wrapper.backend.manual_seed(seed)
    inputs, targets = inputs.to(wrapper.device), targets.to(wrapper.device)
    wrapper.initialize_count_status(model, 0, steps)

    bar = _progress(steps, progress)
    losses: list[float] = []
    scales: list[tuple[int, float]] = []
    updates = 0
    loss_sum = torch.zeros((), device=wrapper.device)
    start = time.perf_counter()
    for step in range(steps):
        with wrapper.optim_context(model):
            loss = torch.nn.functional.mse_loss(model(inputs[step]).float(), targets[step])
        wrapper.update_params(loss)
        loss_sum += loss.detach()
        updates += wrapper.inner_count % accum == 0 or wrapper.inner_count == steps
        # Read device values only every log_every steps: one host sync per N steps.
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = log_every if (step + 1) % log_every == 0 else (step + 1) % log_every
            losses.append(float(loss_sum) / n)
            loss_sum.zero_()
            norm = wrapper.last_grad_norm
            scale = wrapper.loss_scale
            if scale is not None:
                scales.append((step + 1, float(scale)))
            stats = {
                "loss": f"{losses[-1]:.4f}",
                "grad_norm": "-" if norm is None else f"{float(norm):.3f}",
                "scale": "-" if scale is None else f"{float(scale):g}",
            }
            if bar is not None:
                bar.set_postfix(stats)
            elif progress:
                print(f"step {step + 1:4d}/{steps}  " + "  ".join(f"{k} {v}" for k, v in stats.items()))
        if bar is not None:
            bar.update(1)
    wrapper.backend.synchronize()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    skipped, zeroed = wrapper.skipped_steps, wrapper.zeroed_steps
    summary = {
        "device": str(wrapper.device),
        "backend": wrapper.backend.name,
        "dtype": dtype_name(wrapper.cast_dtype),
        "loss_scaling": wrapper.loss_scaler is not None,
        "steps": steps,
        "updates": updates,
        "skipped_steps": 0 if skipped is None else int(skipped),
        "zeroed_steps": 0 if zeroed is None else int(zeroed),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "ms_per_step": 1000 * elapsed / steps,
    }
    if plot:
        summary["plot"] = _plot(plot, losses, log_every, scales)
    return summary


def _plot(path: str, losses: list[float], every: int, scales: list[tuple[int, float]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([every * (i + 1) for i in range(len(losses))], losses, marker="o", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if scales:
        ax2 = ax.twinx()
        ax2.step([s for s, _ in scales], [v for _, v in scales], color="tab:orange", label="loss scale")
        ax2.set_ylabel("loss scale")
        ax2.set_yscale("log")
    ax.set_title("hwoptim demo")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        summary = run_demo(
            device=args.device, dtype=args.dtype, steps=args.steps, accum=args.accum,
            clip=args.clip, seed=args.seed, lr=args.lr, plot=args.plot,
            progress=not args.quiet,
        )
    except (ValueError, RuntimeError, TypeError) as exc:
        print(f"hwoptim demo: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k in summary)
    print("\n".join(f"{k.ljust(width)}  {v:.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}"
                    for k, v in summary.items()))
    if not summary["loss_last"] < summary["loss_first"]:
        print("hwoptim demo: the loss did not fall", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m hwoptim`` command line."""
    parser = argparse.ArgumentParser(prog="python -m hwoptim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="backends, devices and versions on this machine")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_cmd_env)
    demo = sub.add_parser("demo", help="a short synthetic training run with device='auto'")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, npu, ...")
    demo.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: the device's)")
    demo.add_argument("--steps", type=_positive_int, default=60, help="micro-batches (default 60)")
    demo.add_argument("--accum", type=_positive_int, default=4, help="accumulative_counts (default 4)")
    demo.add_argument("--clip", type=_non_negative_float, default=1.0, help="max grad norm, 0 = off")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lr", type=_non_negative_float, default=3e-3)
    demo.add_argument("--plot", metavar="FILE.png", default=None, help="save loss and loss-scale curves")
    demo.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hwoptim`` and the ``hwoptim`` script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
