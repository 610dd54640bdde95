"""Step time and host syncs per step on a CUDA GPU: hand-written loop, hwoptim, mmengine.

For a small and a mid-size model, in fp16 (dynamic loss scaling) and bf16 autocast, with
norm clipping, and with AdamW both as torch picks it on a GPU (foreach) and fused:

- step time: the runners are timed interleaved over several rounds (the device is
  synchronised around each timed segment, never inside it); median per iteration, and the
  median ratio to the hand-written loop within a round;
- host syncs per step: a few iterations run under ``torch.cuda.set_sync_debug_mode("warn")``,
  which makes torch warn at every operation that waits for the device (``.item()``,
  ``float(t)``, a device-to-host copy, ...); the warnings are counted and the Python line
  that triggered each is reported.

The ``wide-adamw-clip`` cases (fp32, 512 small parameter tensors, AdamW with foreach, norm
clipping) time the update itself: eager, and compiled (``-compiled``: the hand-written loop
with its clip+step through ``torch.compile`` as ``torch-compiled``, hwoptim with
``compile_step=True``). For them the table also counts the kernels launched per step (from
the profiler) and the graphs compiled during timing (should be 0).

Expected: hwoptim syncs exactly as often as the hand-written loop doing the same work:
0 per step with a fused AdamW, 1 (torch's GradScaler ``.item()``) for fp16 with a foreach
AdamW, and 0 in bf16, where it builds no scaler. mmengine adds ``float(grad_norm)`` on every
clipped step and keeps a scaler (and its sync) in bf16.

On a machine without CUDA this prints why and exits with status 0. ``--device cpu`` runs
the same code on the CPU, without sync counting, to check the script itself.

Usage::

    python benchmarks/gpu.py                       # the full table and a JSON line
    python benchmarks/gpu.py --rounds 5 --quick    # a fast look
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import pathlib
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

import hwoptim

Run = Callable[[int], None]
SYNC_WARNING = "synchronizing CUDA operation"
REPO = pathlib.Path(__file__).resolve().parents[1]


class Unsupported(Exception):
    """A runner cannot do this case; the message says why (shown as n/a)."""


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # "small", "mid" or "wide"
    dtype: torch.dtype | None  # None: fp32, no autocast
    fused: bool
    compiled: bool = False  # the update through torch.compile

    @property
    def name(self) -> str:
        if self.model == "wide":
            return "wide-adamw-clip" + ("-compiled" if self.compiled else "")
        precision = "fp16" if self.dtype == torch.float16 else "bf16"
        return f"{self.model}-{precision}-{'fused' if self.fused else 'foreach'}"


CASES = [
    Case(model, dtype, fused)
    for model in ("small", "mid")
    for dtype in (torch.float16, torch.bfloat16)
    for fused in (False, True)
] + [Case("wide", None, False), Case("wide", None, False, compiled=True)]
RUNNERS = ["torch", "torch-compiled", "hwoptim", "mmengine"]
MAX_NORM = 1.0


def make_model(kind: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if kind == "small":  # ~27k parameters: the wrapper's Python shows
        model: nn.Module = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16)
        )
    elif kind == "wide":  # 512 small tensors behind a cheap forward: per-tensor launches show
        sys.path.insert(0, str(REPO / "benchmarks"))
        from overhead import WIDE, WideNet

        model = WideNet(WIDE["d_in"], WIDE["branches"])
    else:  # ~19M parameters, 6 transformer layers: a realistic step
        layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    return model.to(device)


def make_batches(kind: str, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = {"small": (64, 64), "wide": (32, 16)}.get(kind, (16, 128, 512))
    out_shape = {"small": (64, 16), "wide": (32, 16)}.get(kind, shape)
    return [
        (torch.randn(shape, generator=generator).to(device),
         torch.randn(out_shape, generator=generator).to(device))
        for _ in range(4)
    ]


def make_optimizer(model: nn.Module, case: Case) -> torch.optim.Optimizer:
    # foreach=None lets torch choose, as users get it: foreach on a GPU
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=case.fused or None)


def _autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


loss_fn = nn.functional.mse_loss


def build_torch(case: Case, device: torch.device) -> Run:
    """The hand-written loop: autocast, (fp16) GradScaler, unscale, clip, step, zero_grad."""
    model = make_model(case.model, device)
    batches = make_batches(case.model, device)
    optimizer = make_optimizer(model, case)
    params = list(model.parameters())
    scaler = torch.amp.GradScaler(device.type) if case.dtype == torch.float16 else None
    dtype, device_type = case.dtype, device.type
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % len(batches)]
            count += 1
            with _autocast(device_type, dtype):
                loss = loss_fn(model(x), y)
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()

    return run


def build_torch_compiled(case: Case, device: torch.device) -> Run:
    """The hand-written fp32 loop with its clip+step compiled by torch.compile."""
    if not case.compiled:
        raise Unsupported("only in the *-compiled cases")
    model = make_model(case.model, device)
    batches = make_batches(case.model, device)
    optimizer = make_optimizer(model, case)
    params = list(model.parameters())

    @torch.compile
    def clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()

    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % len(batches)]
            count += 1
            loss_fn(model(x), y).backward()
            clip_step()
            optimizer.zero_grad()

    return run


def build_hwoptim(case: Case, device: torch.device) -> Run:
    model = make_model(case.model, device)
    optimizer = make_optimizer(model, case)
    clip_grad = dict(max_norm=MAX_NORM)
    wrapper: hwoptim.OptimWrapper
    if case.dtype is None:
        wrapper = hwoptim.OptimWrapper(optimizer, clip_grad=clip_grad, compile_step=case.compiled)
    else:
        wrapper = hwoptim.AmpOptimWrapper(
            optimizer, device=device.type, dtype=case.dtype, clip_grad=clip_grad,
            compile_step=case.compiled,
        )
    return _wrapper_loop(_plain_loop(wrapper), model, make_batches(case.model, device))


def build_mmengine(case: Case, device: torch.device) -> Run:
    try:
        from mmengine.optim import AmpOptimWrapper
    except ImportError as exc:
        raise Unsupported("not installed (pip install 'hwoptim[bench]')") from exc
    if case.dtype is None or case.compiled:
        raise Unsupported("the wide cases compare the hand-written loop and hwoptim only")
    model = make_model(case.model, device)
    name = "float16" if case.dtype == torch.float16 else "bfloat16"
    try:
        wrapper = AmpOptimWrapper(
            optimizer=make_optimizer(model, case), dtype=name, clip_grad=dict(max_norm=MAX_NORM)
        )
    except AssertionError as exc:  # refuses anything but gpu, npu, mlu, musa
        raise Unsupported(f"refuses {device.type}: {exc}") from exc
    return _wrapper_loop(wrapper, model, make_batches(case.model, device))


def _plain_loop(wrapper: Any) -> Any:
    """hwoptim as a loop of one's own runs it. mmengine is imported in this process for its
    own runs, so hwoptim's wrappers would also log to its MessageHub (hwoptim.mmengine)."""
    bridge = sys.modules.get("hwoptim.mmengine")
    if bridge is not None:
        bridge.leave(wrapper)
    return wrapper


def _wrapper_loop(wrapper: Any, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> Run:
    wrapper.initialize_count_status(model, 0, 10**9)
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % len(batches)]
            count += 1
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    return run


BUILDERS = {
    "torch": build_torch, "torch-compiled": build_torch_compiled, "hwoptim": build_hwoptim,
    "mmengine": build_mmengine,
}


def count_syncs(run: Run, steps: int) -> tuple[float, dict[str, int]]:
    """Host syncs per step while ``run`` trains ``steps`` steps, and where they came from."""
    sites: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(steps)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if SYNC_WARNING in str(warning.message):
            sites[f"{_short(warning.filename)}:{warning.lineno}"] += 1
    return sum(sites.values()) / steps, dict(sites)


def count_kernels(run: Run, steps: int) -> float:
    """Device kernels (and copies, fills) launched per step while ``run`` trains ``steps``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(steps)
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(device_events) / steps


def _short(filename: str) -> str:
    """torch/amp/grad_scaler.py rather than the full path of the installed file."""
    path = pathlib.Path(filename)
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return filename.rpartition("site-packages/")[2]


def measure(
    case: Case, runners: list[str], device: torch.device, rounds: int, iters: int,
    sync_steps: int,
) -> dict[str, Any]:
    runs: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    for name in runners:
        try:
            runs[name] = BUILDERS[name](case, device)
        except Unsupported as exc:
            skipped[name] = str(exc)
    for run in runs.values():  # warm-up: cuBLAS handles, autotuning, lazy scaler state
        run(3)
    syncs: dict[str, tuple[float, dict[str, int]] | None] = {}
    kernels: dict[str, float | None] = {}
    for name, run in runs.items():
        syncs[name] = count_syncs(run, sync_steps) if device.type == "cuda" else None
        kernels[name] = count_kernels(run, sync_steps) if device.type == "cuda" else None
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize()
            start = time.perf_counter()
            runs[name](iters)
            synchronize()
            times[name].append((time.perf_counter() - start) / iters)
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    return {"times": times, "syncs": syncs, "kernels": kernels, "skipped": skipped,
            "recompiles": recompiles}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20, help="iterations per runner per round")
    parser.add_argument("--sync-steps", type=int, default=10, help="steps under sync counting")
    parser.add_argument("--quick", action="store_true", help="the small model only")
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES])
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=RUNNERS)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU build)"
        print(f"benchmarks/gpu.py: no CUDA device is visible (torch {torch.__version__}, "
              f"CUDA build: {built}); nothing to measure. The GPU table is pending a machine "
              "with a GPU; `python benchmarks/overhead.py` measures the CPU overhead.")
        return 0
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda[:N] or cpu; got {args.device!r}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", category=FutureWarning)  # mmengine's torch.cuda.amp
    runners = ["torch", *[r for r in args.runners if r != "torch"]]
    cases = [c for c in CASES if (not args.quick or c.model == "small")
             and (args.cases is None or c.name in args.cases)]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, hwoptim {hwoptim.__version__}, "
          f"{args.rounds} rounds x {args.iters} iterations, syncs over {args.sync_steps} steps")
    header = (f"{'case':<24} {'runner':<14} {'ms/step':>8} {'ratio':>6} {'kernels':>8} "
              f"{'syncs/step':>10}  where")
    print(header)
    print("-" * len(header))
    results = []
    for case in cases:
        out = measure(case, runners, device, args.rounds, args.iters, args.sync_steps)
        base = out["times"]["torch"]
        for runner in runners:
            if runner in out["skipped"]:
                print(f"{case.name:<24} {runner:<14} {'n/a':>8}  {out['skipped'][runner]}")
                results.append({"case": case.name, "runner": runner, "status": "n/a",
                                "reason": out["skipped"][runner]})
                continue
            times = out["times"][runner]
            ms = statistics.median(times) * 1e3
            ratio = statistics.median(t / b for t, b in zip(times, base))
            counted = out["syncs"][runner]
            per_step, sites = counted if counted is not None else (None, {})
            shown = "n/a" if per_step is None else f"{per_step:.2f}"
            where = ", ".join(f"{site} x{n}" for site, n in sorted(sites.items()))
            launched = out["kernels"][runner]
            kernels = "n/a" if launched is None else f"{launched:.0f}"
            print(f"{case.name:<24} {runner:<14} {ms:8.3f} {ratio:6.3f} {kernels:>8} "
                  f"{shown:>10}  {where}")
            results.append({"case": case.name, "runner": runner, "status": "ok",
                            "ms_per_step": round(ms, 4), "ratio": round(ratio, 4),
                            "kernels_per_step": launched, "syncs_per_step": per_step,
                            "sync_sites": sites})
        if case.compiled:
            print(f"# {case.name}: {out['recompiles']} graph(s) compiled during the timed rounds")
            results.append({"case": case.name, "recompiles_timed": out["recompiles"]})
        sys.stdout.flush()
    print(json.dumps({"benchmark": "hwoptim-gpu", "device": name, "torch": torch.__version__,
                      "hwoptim": hwoptim.__version__, "rounds": args.rounds,
                      "iters": args.iters, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
