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
    # stderr, as progress output goes: redirected stdout keeps only the summary
    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)


#: what --plot draws; the --help text and the figure's notes say the same
PLOT_HELP = (
    "save a figure (PNG, or any format matplotlib writes, by the file's extension) of the "
    "loss at every micro-batch, the gradient norm before clipping at every update, in total "
    "and per layer (with --clip > 0) and, under float16, the loss scale at every update; bfloat16 and float32 "
    "have no loss scaler, and the figure says so in place of that curve"
)


def _check_plot_path(path: str) -> None:
    """Refuse, before any training, a --plot file that cannot be written: no matplotlib, a
    folder that does not exist, a folder given as the file, or a format matplotlib lacks."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError(
            f"--plot {path}: matplotlib is not installed (pip install matplotlib, or "
            'pip install "hwoptim[demo]")'
        ) from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path}: the folder {folder} does not exist; create it or give another path")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path}: that is a folder; give a file name such as {os.path.join(path, 'demo.png')}")
    writable = os.access(path, os.W_OK) if os.path.exists(path) else os.access(folder, os.W_OK)
    if not writable:
        raise ValueError(f"--plot {path}: not writable here; give a path you can write")
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if extension not in formats:
        raise ValueError(
            f"--plot {path}: matplotlib cannot write {extension or 'a file without an extension'!r}; "
            f"use one of {', '.join(sorted(formats))}"
        )


class Series:
    """One curve of the demo's figure: which panel it goes in, its legend label, and its
    points (step, value). New curves (per-group norms, ...) are more of these."""

    def __init__(self, panel: str, label: str, steps: list[int], values: list[float], **style: Any) -> None:
        self.panel, self.label, self.steps, self.values, self.style = panel, label, steps, values, style


#: the demo model's param groups, one per Linear layer
DEMO_GROUPS = ("in", "hidden", "out")

#: the figure's panels, top to bottom: (name, y label, log scale)
PANELS = (("loss", "loss (MSE)", True), ("grad_norm", "gradient norm", True), ("loss_scale", "loss scale", True))


def demo_figure(title: str, series: list[Series], notes: dict[str, str]) -> Any:
    """The demo's figure: a panel per entry of PANELS holding its series, each with a
    legend; a panel with no series shows its note (why there is nothing to draw)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7.5), layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (panel, ylabel, log) in zip(axes, PANELS):
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        drawn = [s for s in series if s.panel == panel]
        for s in drawn:
            ax.plot(s.steps, s.values, label=s.label, **s.style)
        if drawn:
            if log and all(v > 0 for s in drawn for v in s.values):
                ax.set_yscale("log")
            ax.legend(loc="best", fontsize="small")
        else:
            ax.set_yticks([])
        if panel in notes:
            ax.text(0.5, 0.5 if not drawn else 0.1, notes[panel], transform=ax.transAxes,
                    ha="center", va="center", fontsize="small", wrap=True)
    axes[-1].set_xlabel("micro-batch (step)")
    fig.suptitle(title)
    return fig


def run_demo(
    device: str = "auto", dtype: str | None = None, steps: int = 60, accum: int = 4,
    clip: float = 1.0, seed: int = 0, lr: float = 3e-3, batch_size: int = 64,
    plot: str | None = None, progress: bool = True, log_every: int = 10,
) -> dict[str, Any]:
    """Train a small MLP on synthetic regression data; return the summary ``demo`` prints.

    Whether training worked is judged on a held-out batch, evaluated before and after
    (``loss_before``, ``loss_after``), so it holds for any number of steps, one included.
    The loss, grad norm and loss scale of every step stay on the device until the end (and
    are read every ``log_every`` steps for the progress bar): one host sync per N steps.
    """
    from hwoptim import AmpOptimWrapper, get_backend
    from hwoptim.backends.base import dtype_name

    if plot:
        _check_plot_path(plot)  # before training, not after it
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    # the first batch is held out: the same one whatever --steps is
    inputs = torch.randn(steps + 1, batch_size, 32)
    with torch.no_grad():
        targets = teacher(inputs) + 0.01 * torch.randn(steps + 1, batch_size, 1)

    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(),
        torch.nn.Linear(128, 1),
    )
    # The model goes to the device before the optimizer is built: on many devices .to()
    # replaces the parameters, and the optimizer must hold the new ones.
    backend = get_backend(device)
    model.to(backend.device())
    # a named param group per layer: the wrapper reports each one's norm (last_grad_norms)
    optimizer = torch.optim.AdamW(
        [dict(params=model[i].parameters(), name=name) for i, name in zip((0, 2, 4), DEMO_GROUPS)], lr=lr
    )
    wrapper = AmpOptimWrapper(
        optimizer, device=backend, dtype=dtype, accumulative_counts=accum,
        clip_grad=dict(max_norm=clip) if clip > 0 else None,
    )
    wrapper.backend.manual_seed(seed)
    inputs, targets = inputs.to(wrapper.device), targets.to(wrapper.device)
    held_out = (inputs[0], targets[0])
    wrapper.initialize_count_status(model, 0, steps)

    def held_out_loss() -> torch.Tensor:  # in fp32, whatever the training dtype
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(held_out[0]), held_out[1])

    loss_before = held_out_loss()
    bar = _progress(steps, progress)
    losses = torch.zeros(steps, device=wrapper.device)  # every step's loss, on the device
    update_steps: list[int] = []
    norms: list[torch.Tensor] = []  # per update, on the device
    group_norms: list[torch.Tensor] = []  # per update, one entry per layer, on the device
    scales: list[torch.Tensor] = []
    start = time.perf_counter()
    for step in range(steps):
        with wrapper.optim_context(model):
            loss = torch.nn.functional.mse_loss(model(inputs[step + 1]).float(), targets[step + 1])
        wrapper.update_params(loss)
        losses[step] = loss.detach()
        if wrapper.inner_count % accum == 0 or wrapper.inner_count == steps:  # it updated
            update_steps.append(step + 1)
            norm, scale = wrapper.last_grad_norm, wrapper.loss_scale
            if norm is not None:
                norms.append(norm.detach().clone())
                group_norms.append(torch.stack(list(wrapper.last_grad_norms.values())).detach().clone())
            if scale is not None:  # the scaler's own tensor, which it changes in place
                scales.append(scale.detach().clone())
        # Read device values only every log_every steps: one host sync per N steps.
        if progress and ((step + 1) % log_every == 0 or step + 1 == steps):
            first = step + 1 - ((step % log_every) + 1)
            stats = {
                "loss": f"{losses[first:step + 1].mean().item():.4f}",
                "grad_norm": f"{norms[-1].item():.3f}" if norms else "-",
                "scale": f"{scales[-1].item():g}" if scales else "-",
            }
            if bar is not None:
                bar.set_postfix(stats)
            else:
                print(f"step {step + 1:4d}/{steps}  " + "  ".join(f"{k} {v}" for k, v in stats.items()),
                      file=sys.stderr)
        if bar is not None:
            bar.update(1)
    wrapper.backend.synchronize()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    before, after = loss_before.item(), held_out_loss().item()
    skipped, zeroed = wrapper.skipped_steps, wrapper.zeroed_steps
    per_layer = torch.stack(group_norms).float().tolist() if group_norms else []  # one read
    bad = wrapper.nonfinite_groups
    bad_flags = torch.stack(list(bad.values())).tolist() if bad else []
    summary = {
        "device": str(wrapper.device),
        "backend": wrapper.backend.name,
        "dtype": dtype_name(wrapper.cast_dtype),
        "loss_scaling": wrapper.loss_scaler is not None,
        "steps": steps,
        "updates": len(update_steps),
        "skipped_steps": 0 if skipped is None else int(skipped),
        "zeroed_steps": 0 if zeroed is None else int(zeroed),
        # the last update's norm per layer, and the layers with inf/nan at the last bad one
        "group_norms": "  ".join(f"{n} {v:.3g}" for n, v in zip(DEMO_GROUPS, per_layer[-1])) if per_layer else "-",
        "bad_groups": ", ".join(str(n) for n, flag in zip(bad, bad_flags) if flag) or "-",
        "loss_before": before,
        "loss_after": after,
        "ms_per_step": 1000 * elapsed / steps,
    }
    if plot:
        step_numbers = list(range(1, steps + 1))
        series = [Series("loss", "training loss, per micro-batch", step_numbers, losses.tolist(), linewidth=1),
                  Series("loss", "held-out loss, before and after", [0, steps],
                         [before, after], marker="o", linestyle="none")]
        notes: dict[str, str] = {}
        if norms:
            series.append(Series("grad_norm", "grad norm before clipping, per update", update_steps,
                                 torch.stack(norms).float().tolist(), marker=".", markersize=3))
            for name, values in zip(DEMO_GROUPS, zip(*per_layer)):
                series.append(Series("grad_norm", f"layer '{name}' (wrapper.last_grad_norms)", update_steps,
                                     list(values), linewidth=0.8, alpha=0.8))
            series.append(Series("grad_norm", f"clip max_norm = {clip:g}", [0, steps], [clip, clip],
                                 linestyle=":", color="gray"))
        else:
            notes["grad_norm"] = "no grad norm: clipping is off (--clip 0), so none is computed"
        if scales:
            series.append(Series("loss_scale", "loss scale, per update (dynamic: backs off on inf/nan)",
                                 update_steps, torch.stack(scales).float().tolist(), drawstyle="steps-post"))
        else:
            notes["loss_scale"] = (f"no loss scale: {summary['dtype']} trains without a loss scaler "
                                   "(its range needs none; only float16 is scaled)")
        title = (f"hwoptim demo on {summary['device']} ({summary['backend']} backend), {summary['dtype']}, "
                 f"accumulation {accum}, {summary['updates']} updates")
        fig = demo_figure(title, series, notes)
        fig.savefig(plot)
        summary["plot"] = plot
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        summary = run_demo(
            device=args.device, dtype=args.dtype, steps=args.steps, accum=args.accum,
            clip=args.clip, seed=args.seed, lr=args.lr, plot=args.plot,
            progress=not args.quiet,
        )
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        print(f"hwoptim demo: error: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k in summary)
    print("\n".join(f"{k.ljust(width)}  {v:.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}"
                    for k, v in summary.items()))
    if not summary["loss_after"] < summary["loss_before"]:
        print("hwoptim demo: the held-out loss did not fall", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m hwoptim`` command line."""
    parser = argparse.ArgumentParser(prog="python -m hwoptim", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="backends, devices and versions on this machine")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_cmd_env)
    demo = sub.add_parser(
        "demo", help="a short synthetic training run with device='auto'",
        description="Train a small MLP on synthetic data with AmpOptimWrapper: gradient accumulation, "
        "clipping and the device's amp dtype. Prints a summary (stdout) and exits 1 if the loss on a "
        "held-out batch did not fall; progress goes to stderr.",
    )
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, npu, ...")
    demo.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: the device's)")
    demo.add_argument("--steps", type=_positive_int, default=60, help="micro-batches (default 60)")
    demo.add_argument("--accum", type=_positive_int, default=4, help="accumulative_counts (default 4)")
    demo.add_argument("--clip", type=_non_negative_float, default=1.0,
                      help="clip_grad max_norm: the largest gradient norm an update uses (default 1.0; 0 = no "
                      "clipping, and no grad norm is computed)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the data, the model and the device's generator (default 0)")
    demo.add_argument("--lr", type=_non_negative_float, default=3e-3, help="AdamW's learning rate (default 0.003)")
    demo.add_argument("--plot", metavar="FILE.png", default=None, help=PLOT_HELP)
    demo.add_argument("--quiet", action="store_true", help="no progress output, only the summary")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hwoptim`` and the ``hwoptim`` script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
