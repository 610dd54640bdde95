"""Wrapper overhead on the CPU: hwoptim and its peers against the hand-written torch loop.

Every runner trains its own copy of the same model on the same batches with the same
optimizer and does the same math: the loss divided by the accumulation window, autocast,
loss scaling, norm clipping, the optimizer step and zero_grad. What differs is the Python
around it, which is what a wrapper costs. The runners are timed in one process, in rounds:
each round runs every other runner once, each right next to a segment of the hand-written
loop (one accumulation window each, CPU time of this thread by default), and takes the
ratio within that pair, so the drifting speed of a shared machine cancels. The table shows
medians over rounds, with a 95% confidence interval of the median ratio.

Runners:
  torch        the hand-written loop: the same clip, division, autocast and scaler as hwoptim.
  torch-again  the hand-written loop once more, measured like the others: its ratio, which
               should be 1.000, shows how far the measurement itself can be trusted.
  torch+guard  the hand-written loop plus the work hwoptim does by design where it clips or
               scales: the sync-free non-finite guard and the skipped-step counter (see
               GUARD below). (torch+guard) / torch is the cost of that guarantee;
               hwoptim / (torch+guard) is the pure wrapper overhead.
  torch-compiled  (the *-compiled cases) the hand-written loop with its clip+step compiled
               by torch.compile: the reference for hwoptim's compile_step=True ("vs ref").
  hwoptim      OptimWrapper (fp32) or AmpOptimWrapper(device="cpu") (bf16, fp16).
  hwoptim+hub  the same wrapper as mmengine's Runner runs it, also logging grad_norm and
               loss_scale to mmengine's MessageHub (hwoptim.mmengine), as mmengine does.
  mmengine     mmengine's OptimWrapper / AmpOptimWrapper, when mmengine is installed.
  accelerate   accelerate's Accelerator(cpu=True), when accelerate is installed.

Cases (one thread, AdamW with foreach=True unless fused, as torch picks on a GPU):
  fp32                     plain fp32, no accumulation, no clipping
  fp32-acc4-clip           accumulation over 4 micro-batches, norm clipping
  bf16-acc4-clip           the same in bf16 autocast (no scaler: bf16 needs none)
  fp16-dynamic-fused-clip  fp16 autocast, dynamic GradScaler, fused AdamW, norm clipping
  wide-fp32-clip           512 small parameter tensors, SGD, norm clipping
  wide-fp32-clip-fused     the same with a fused SGD
  wide-adamw-clip          512 small parameter tensors, AdamW (foreach), norm clipping
  wide-adamw-clip-compiled the same with the update compiled (hwoptim: compile_step=True);
                           ratios are still to the eager hand-written loop, "vs ref" to
                           torch-compiled; the graphs compiled during timing are reported

A peer that refuses a case (mmengine's AmpOptimWrapper on CPU) or would silently run other
math (accelerate turns fp16 off on CPU: no autocast, no scaler) is reported "n/a" with the
reason; nothing is patched to make it run.

Before timing, every runner trains a few steps from the same start and its parameters are
compared with the hand-written loop's ("same": the max relative difference), so the table
cannot compare different work by mistake.

Usage::

    python benchmarks/overhead.py                 # all cases, the table and a JSON line
    python benchmarks/overhead.py --rounds 51 --cases fp32 wide-fp32-clip
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import random
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

import hwoptim

Batch = tuple[Tensor, Tensor]
Run = Callable[[int], None]  # runs n training iterations


class Unsupported(Exception):
    """A runner cannot do this case's work; the message says why (shown as n/a)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One training configuration every runner must reproduce exactly."""

    name: str
    model: str  # "small" or "wide"
    dtype: torch.dtype | None  # autocast dtype; None: fp32, no autocast
    acc: int  # accumulative_counts
    max_norm: float | None  # norm clipping, or None
    fused: bool  # fused=True: the optimizer takes found_inf and skips on the device
    optimizer: str = "adamw"  # "adamw" or "sgd"
    compiled: bool = False  # the update through torch.compile (hwoptim: compile_step=True)

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    @property
    def guarded(self) -> bool:
        """Whether hwoptim does work here that the plain hand-written loop does not."""
        return self.max_norm is not None or self.scaled


CASES = [
    Case("fp32", "small", None, 1, None, False),
    Case("fp32-acc4-clip", "small", None, 4, 1.0, False),
    Case("bf16-acc4-clip", "small", torch.bfloat16, 4, 1.0, False),
    Case("fp16-dynamic-fused-clip", "small", torch.float16, 1, 1.0, True),
    # SGD for the wide model: its own per-parameter work is the lightest, as a foreach
    # optimizer's is on a GPU, so what the wrapper adds per parameter is not hidden.
    Case("wide-fp32-clip", "wide", None, 1, 1.0, False, "sgd"),
    Case("wide-fp32-clip-fused", "wide", None, 1, 1.0, True, "sgd"),
    # AdamW (foreach, no fused kernel used), eager and with the update compiled: what a
    # compiled update buys where most people's optimizers have no fused kernel.
    Case("wide-adamw-clip", "wide", None, 1, 1.0, False),
    Case("wide-adamw-clip-compiled", "wide", None, 1, 1.0, False, compiled=True),
]
RUNNERS = [
    "torch", "torch-again", "torch+guard", "torch-compiled", "hwoptim", "hwoptim+hub", "mmengine",
    "accelerate",
]

# Sizes: small enough that the Python around each step is visible next to the math.
SMALL = dict(d_in=64, hidden=128, d_out=16, batch=32)
WIDE = dict(d_in=16, branches=256, batch=32)  # 2 tensors per branch: 512 parameter tensors
N_BATCHES = 8
MAX_COUNTS = 10**9  # what initialize_count_status gets: a long run
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


# -- models and data -------------------------------------------------------------------


class WideNet(nn.Module):
    """Hundreds of small parameter tensors behind a cheap forward, so per-parameter
    Python work (a wrapper's, an optimizer's) shows next to the math.

    Each branch is a small linear map; the forward stacks them into one batched matmul,
    as grouped or multi-head layers do, instead of one Python call per branch.
    """

    def __init__(self, d_in: int, branches: int) -> None:
        super().__init__()
        scale = d_in**-0.5
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(d_in, d_in) * scale) for _ in range(branches)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(d_in)) for _ in range(branches))

    def forward(self, x: Tensor) -> Tensor:
        weight = torch.stack(list(self.weights))  # (branches, d_in, d_in)
        bias = torch.stack(list(self.biases)).unsqueeze(1)  # (branches, 1, d_in)
        return torch.baddbmm(bias, x.expand(len(self.weights), -1, -1), weight).mean(0)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "small":
        d_in, hidden, d_out = SMALL["d_in"], SMALL["hidden"], SMALL["d_out"]
        return nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, d_out),
        )
    return WideNet(WIDE["d_in"], WIDE["branches"])


def make_batches(kind: str) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    size = SMALL if kind == "small" else WIDE
    d_out = size.get("d_out", size["d_in"])
    return [
        (
            torch.randn(size["batch"], size["d_in"], generator=generator),
            torch.randn(size["batch"], d_out, generator=generator),
        )
        for _ in range(N_BATCHES)
    ]


def make_optimizer(model: nn.Module, case: Case) -> torch.optim.Optimizer:
    # foreach=True on CPU too, as torch picks on a GPU: the optimizer then does no
    # per-parameter Python work of its own, so the wrapper's shows.
    kind = {"fused": True} if case.fused else {"foreach": True}
    if case.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-2, **kind)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)


loss_fn = nn.functional.mse_loss


# -- the hand-written loop ---------------------------------------------------------------


def build_torch(case: Case, model: nn.Module, batches: list[Batch], guard: bool = False) -> Run:
    """The loop a user writes by hand for ``case``; ``guard``: plus hwoptim's guarantee.

    GUARD (what hwoptim adds by design, and this runner reproduces with ``guard=True``):
    with clipping, a fused optimizer gets found_inf = (norm * 0).nan_to_num_(nan=1.0) as
    ``found_inf`` and skips a non-finite step itself; any other optimizer gets its gradients'
    nans zeroed (after a clip by an inf/nan norm every finite one is already 0), so a bad
    step never reaches the parameters. Under fp16 the scaler already skips such steps. The
    counts are kept as hwoptim keeps them: each update appends its found_inf (a real skip)
    or, non-fused, its norm (a step with zeroed gradients) to a list that is folded into
    skipped_steps and zeroed_steps every 256 updates.
    """
    optimizer = make_optimizer(model, case)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    acc, max_norm, dtype = case.acc, case.max_norm, case.dtype
    clip = torch.nn.utils.clip_grad_norm_
    scaler = torch.amp.GradScaler("cpu") if case.scaled else None
    skipped, zeroed = torch.zeros(()), torch.zeros(())
    n_batches = len(batches)
    count = 0

    pending: list[Tensor] = []  # found_inf > 0: skipped; a non-finite norm: zeroed

    def note(value: Tensor) -> None:
        pending.append(value)
        if len(pending) >= 256:
            stacked = torch.stack([v.reshape(()) for v in pending])
            if case.fused or case.scaled:
                skipped.add_((stacked > 0).sum())
            else:
                zeroed.add_((~torch.isfinite(stacked)).sum())
            pending.clear()

    def guarded_step(norm: Tensor) -> None:
        if case.fused:
            found_inf = (norm * 0.0).nan_to_num_(nan=1.0)
            note(found_inf)
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            optimizer.step()
            del optimizer.found_inf  # type: ignore[attr-defined]
        else:
            note(norm)
            for p in params:
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)
            optimizer.step()

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % n_batches]
            if dtype is None:
                loss = loss_fn(model(x), y)
            else:
                with torch.autocast("cpu", dtype=dtype):
                    loss = loss_fn(model(x), y)
            if acc > 1:
                loss = loss / acc
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
            count += 1
            if count % acc:
                continue
            if scaler is not None:
                if max_norm is not None:
                    scaler.unscale_(optimizer)
                    clip(params, max_norm)
                scaler.step(optimizer)
                if guard:  # one device here: its found_inf is the count
                    states = scaler._per_optimizer_states[id(optimizer)]
                    (found_inf,) = states["found_inf_per_device"].values()
                    note(found_inf)
                scaler.update()
            elif max_norm is None:
                optimizer.step()
            elif guard:
                guarded_step(clip(params, max_norm))
            else:
                clip(params, max_norm)
                optimizer.step()
            optimizer.zero_grad()

    return run


def build_torch_compiled(case: Case, model: nn.Module, batches: list[Batch]) -> Run:
    """The hand-written loop with its own clip+step compiled by torch.compile (no guard,
    no skip count): the reference a compiled hwoptim update is measured against."""
    if not case.compiled:
        raise Unsupported("only in the *-compiled cases")
    optimizer = make_optimizer(model, case)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = case.max_norm
    clip = torch.nn.utils.clip_grad_norm_

    @torch.compile
    def clip_step() -> None:
        if max_norm is not None:
            clip(params, max_norm)
        optimizer.step()

    n_batches = len(batches)
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % n_batches]
            count += 1
            loss_fn(model(x), y).backward()
            clip_step()
            optimizer.zero_grad()

    return run


# -- hwoptim -----------------------------------------------------------------------------


def build_hwoptim(case: Case, model: nn.Module, batches: list[Batch]) -> Run:
    wrapper = _plain_loop(_hwoptim_wrapper(case, model))
    wrapper.initialize_count_status(model, 0, MAX_COUNTS)
    return _wrapper_loop(wrapper, model, batches)


def build_hwoptim_hub(case: Case, model: nn.Module, batches: list[Batch]) -> Run:
    """hwoptim as mmengine's Runner runs it: each update also queues grad_norm and
    loss_scale for the MessageHub (hwoptim.mmengine), which mmengine's wrapper logs too."""
    if case.compiled:
        raise Unsupported("the compiled case compares the plain loops")
    try:
        import hwoptim.mmengine as bridge
    except ImportError as exc:
        raise Unsupported("mmengine not installed (pip install 'hwoptim[mmengine]')") from exc
    wrapper = _hwoptim_wrapper(case, model)
    bridge.join(wrapper)
    wrapper.initialize_count_status(model, 0, MAX_COUNTS)
    return _wrapper_loop(wrapper, model, batches)


def _hwoptim_wrapper(case: Case, model: nn.Module) -> hwoptim.OptimWrapper:
    optimizer = make_optimizer(model, case)
    clip_grad = None if case.max_norm is None else dict(max_norm=case.max_norm)
    if case.dtype is None:
        return hwoptim.OptimWrapper(optimizer, case.acc, clip_grad, compile_step=case.compiled)
    return hwoptim.AmpOptimWrapper(
        optimizer, device="cpu", dtype=case.dtype, accumulative_counts=case.acc,
        clip_grad=clip_grad, compile_step=case.compiled,
    )


def _plain_loop(wrapper: Any) -> Any:
    """hwoptim as a loop of one's own runs it. mmengine is imported in this process for its
    own runs, so hwoptim's wrappers would also log to its MessageHub (hwoptim.mmengine)."""
    bridge = sys.modules.get("hwoptim.mmengine")
    if bridge is not None:
        bridge.leave(wrapper)
    return wrapper


def _wrapper_loop(wrapper: Any, model: nn.Module, batches: list[Batch]) -> Run:
    """mmengine's loop, which hwoptim keeps: forward in optim_context, then update_params."""
    n_batches = len(batches)
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % n_batches]
            count += 1
            with wrapper.optim_context(model):
                loss = loss_fn(model(x), y)
            wrapper.update_params(loss)

    return run


# -- peers -------------------------------------------------------------------------------


def build_mmengine(case: Case, model: nn.Module, batches: list[Batch]) -> Run:
    if case.compiled:
        raise Unsupported("no compiled update")
    try:
        from mmengine.optim import AmpOptimWrapper, OptimWrapper
    except ImportError as exc:
        raise Unsupported("not installed (pip install 'hwoptim[bench]')") from exc
    optimizer = make_optimizer(model, case)
    clip_grad = None if case.max_norm is None else dict(max_norm=case.max_norm)
    try:
        if case.dtype is None:
            wrapper = OptimWrapper(optimizer, case.acc, clip_grad)
        else:
            name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[case.dtype]
            wrapper = AmpOptimWrapper(
                optimizer=optimizer, dtype=name, accumulative_counts=case.acc,
                clip_grad=clip_grad,
            )
    except AssertionError as exc:  # "only available training on gpu, npu, mlu or musa"
        raise Unsupported(f"refuses CPU: {exc}") from exc
    wrapper.initialize_count_status(model, 0, MAX_COUNTS)
    return _wrapper_loop(wrapper, model, batches)


def build_accelerate(case: Case, model: nn.Module, batches: list[Batch]) -> Run:
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
    except ImportError as exc:
        raise Unsupported("not installed (pip install 'hwoptim[bench]')") from exc
    if case.compiled:
        raise Unsupported("no compiled update")
    # The Accelerator's state is process-global: start each case from a clean one.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    precision = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[case.dtype]
    accelerator = Accelerator(
        cpu=True, mixed_precision=precision, gradient_accumulation_steps=case.acc
    )
    if case.scaled and accelerator.scaler is None:
        raise Unsupported("fp16 on CPU silently runs fp32 (no autocast, no scaler)")
    model, optimizer = accelerator.prepare(model, make_optimizer(model, case))
    max_norm = case.max_norm
    params = list(model.parameters())
    n_batches = len(batches)
    count = 0

    def run(n: int) -> None:
        nonlocal count
        for _ in range(n):
            x, y = batches[count % n_batches]
            count += 1
            with accelerator.accumulate(model):
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
                if max_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad()

    return run


BUILDERS: dict[str, Callable[[Case, nn.Module, list[Batch]], Run]] = {
    "torch": build_torch,
    "torch-again": build_torch,
    "torch+guard": lambda case, model, batches: build_torch(case, model, batches, guard=True),
    "torch-compiled": build_torch_compiled,
    "hwoptim": build_hwoptim,
    "hwoptim+hub": build_hwoptim_hub,
    "mmengine": build_mmengine,
    "accelerate": build_accelerate,
}


# -- measuring ---------------------------------------------------------------------------


def check_same_work(case: Case, runners: list[str], steps: int) -> dict[str, float]:
    """Train each runner ``steps`` updates from the same start; the max relative parameter
    difference to the hand-written loop (0.0: bit-identical)."""
    batches = make_batches(case.model)
    finals: dict[str, list[Tensor]] = {}
    for name in runners:
        model = make_model(case.model)
        try:
            run = BUILDERS[name](case, model, batches)
        except Unsupported:
            continue
        run(steps * case.acc)
        finals[name] = [p.detach().clone() for p in model.parameters()]
    reference = finals["torch"]
    diffs = {}
    for name, params in finals.items():
        worst = 0.0
        for p, q in zip(params, reference):
            scale = q.abs().max().clamp_min(1e-12)
            worst = max(worst, float((p - q).abs().max() / scale))
        diffs[name] = worst
    return diffs


def measure(
    case: Case, runners: list[str], rounds: int, iters: int, clock: Callable[[], float],
    block: int = 25,
) -> dict[str, Any]:
    """Time ``runners`` on ``case``, each in pairs with its own hand-written twin.

    Each round runs, for every runner, one segment of it and one of its twin (a hand-written
    loop of its own) back to back, in alternating order, and takes the ratio of the pair.
    On a shared machine the speed of a core drifts by tens of percent within milliseconds;
    two adjacent segments see nearly the same speed. A twin per runner, rather than one
    hand-written loop shared by all, keeps the two sides of every pair equally frequent and
    so equally warm in the caches. Every ``block`` rounds all runners and twins are built
    afresh, in a shuffled order: where tensors land in memory changes a loop's speed by a
    percent or two, and rebuilding turns that bias into noise the median averages out.

    A compiled case is built once: every build compiles afresh (minutes on a busy CPU),
    and torch.compile's recompile limit counts every new optimizer. Its result also counts
    the graphs compiled during the timed rounds (``recompiles``, which should be 0).
    """
    from torch._dynamo.utils import counters

    if case.compiled:
        block = rounds
    batches = make_batches(case.model)
    shuffle = random.Random(0).shuffle
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name in runners:
        if name == "torch" or (name == "torch+guard" and (not case.guarded or case.compiled)):
            continue
        try:
            BUILDERS[name](case, make_model(case.model), batches)
            names.append(name)
        except Unsupported as exc:
            skipped[name] = str(exc)

    def build() -> dict[tuple[str, str], Run]:
        keys = [(name, side) for name in names for side in (name, "torch")]
        shuffle(keys)
        built = {key: BUILDERS[key[1]](case, make_model(case.model), batches) for key in keys}
        for key, run in built.items():  # warm-up: allocations, lazy state, caches, compiling
            start = time.perf_counter()
            run(2 * iters)
            warm_up.setdefault(key[1], time.perf_counter() - start)
        return built

    times: dict[str, list[float]] = {name: [] for name in ["torch", *names]}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    graphs_built = 0
    warm_up: dict[str, float] = {}  # runner: wall seconds of its first warm-up (compiling)
    gc.collect()
    # No collection inside a segment: it would land in one runner's time at random. The
    # loops make no reference cycles to speak of; collect between blocks.
    gc.disable()
    try:
        for r in range(rounds):
            if r % block == 0:
                runs = None
                gc.collect()
                runs = build()
                graphs_built = counters["stats"]["unique_graphs"]
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                pair = [name, "torch"] if r % 2 else ["torch", name]
                seconds = {}
                for side in pair:
                    run = runs[(name, side)]
                    start = clock()
                    run(iters)
                    seconds[side] = clock() - start
                    times[side].append(seconds[side] / iters)
                ratios[name].append(seconds[name] / seconds["torch"])
    finally:
        gc.enable()
    ratios["torch"] = [1.0] * rounds
    recompiles = counters["stats"]["unique_graphs"] - graphs_built
    return {"times": times, "ratios": ratios, "skipped": skipped, "recompiles": recompiles,
            "warm_up_s": warm_up}


def median_ci(values: list[float]) -> tuple[float, float]:
    """A 95% confidence interval of the median, from order statistics (no normality)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * n**0.5  # 1.96 * sqrt(n) / 2
    low = max(int(n / 2 - half), 0)
    high = min(int(n / 2 + half + 1), n - 1)
    return ordered[low], ordered[high]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=201, help="rounds (medians over them)")
    parser.add_argument(
        "--iters", type=int, default=4, help="iterations per segment (one accumulation window)"
    )
    parser.add_argument("--cases", nargs="+", choices=[c.name for c in CASES])
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=RUNNERS)
    parser.add_argument(
        "--clock", choices=CLOCKS, default="thread",
        help="thread: CPU time of this thread (default; time the OS gives other processes "
        "on a shared machine is not counted, and with one torch thread all work is here); "
        "wall: elapsed time",
    )
    parser.add_argument(
        "--check-steps", type=int, default=3, help="updates for the same-work check"
    )
    args = parser.parse_args(argv)
    if args.iters % 4:
        parser.error("--iters must be a multiple of 4 (the accumulation window)")
    runners = ["torch", *[r for r in args.runners if r != "torch"]]
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # denormals would time the CPU's microcode, not the code
    warnings.filterwarnings("ignore")  # peers' deprecation chatter; it would not change a time
    logging_quiet()

    print(f"# torch {torch.__version__}, hwoptim {hwoptim.__version__}, {peer_versions()}")
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, 1 thread, {args.rounds} rounds x {args.iters} iterations, "
          f"{args.clock} clock")
    header = (f"{'case':<26} {'runner':<12} {'us/iter':>8} {'ratio':>6} {'95% CI':>11} "
              f"{'vs ref':>8} {'same':>7}")
    print(header)
    print("-" * len(header))
    results = []
    for case in cases:
        same = check_same_work(case, runners, args.check_steps)
        out = measure(case, runners, args.rounds, args.iters, CLOCKS[args.clock])
        reference = "torch-compiled" if case.compiled else "torch+guard"
        guard_ratios = out["ratios"].get(reference)
        for name in runners:
            if name in out["skipped"]:
                print(f"{case.name:<26} {name:<12} {'n/a':>8}  {out['skipped'][name]}")
                results.append({"case": case.name, "runner": name, "status": "n/a",
                                "reason": out["skipped"][name]})
                continue
            if name not in out["times"]:
                continue
            us = statistics.median(out["times"][name]) * 1e6
            ratio = statistics.median(out["ratios"][name])
            low, high = median_ci(out["ratios"][name])
            vs_guard = None
            if guard_ratios is not None and not name.startswith("torch"):
                vs_guard = statistics.median(
                    r / g for r, g in zip(out["ratios"][name], guard_ratios)
                )
            shown = "" if vs_guard is None else f"{vs_guard:.3f}"
            ci = "" if name == "torch" else f"{low:.3f}-{high:.3f}"
            print(f"{case.name:<26} {name:<12} {us:8.1f} {ratio:6.3f} {ci:>11} {shown:>8} "
                  f"{same.get(name, float('nan')):7.0e}")
            results.append({
                "case": case.name, "runner": name, "status": "ok",
                "us_per_iter": round(us, 2), "ratio": round(ratio, 4),
                "ratio_ci95": [round(low, 4), round(high, 4)],
                f"ratio_vs_{reference.replace('-', '_').replace('+', '_')}": (
                    None if vs_guard is None else round(vs_guard, 4)
                ),
                "max_rel_param_diff": same.get(name),
            })
        if case.compiled:
            warm = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(out["warm_up_s"].items()))
            print(f"# {case.name}: {out['recompiles']} graph(s) compiled during the timed "
                  f"rounds; first {2 * args.iters} iterations (wall, compiling): {warm}")
            results.append({"case": case.name, "recompiles_timed": out["recompiles"],
                            "warm_up_s": out["warm_up_s"]})
        sys.stdout.flush()
    print(json.dumps({
        "benchmark": "hwoptim-overhead", "torch": torch.__version__,
        "hwoptim": hwoptim.__version__, "peers": peer_versions(), "threads": 1,
        "rounds": args.rounds, "iters": args.iters, "clock": args.clock, "results": results,
    }))
    return 0


def peer_versions() -> str:
    versions = []
    for module in ("mmengine", "accelerate"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} absent")
    return ", ".join(versions)


def logging_quiet() -> None:
    """mmengine logs a warning per wrapper; accelerate logs its state: keep the table clean."""
    import logging

    logging.disable(logging.WARNING)
    with contextlib.suppress(ImportError):
        from mmengine.logging import MMLogger

        MMLogger.get_current_instance().setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
