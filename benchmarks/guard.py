"""What hwoptim's sync-free non-finite guard costs, next to the clip and its alternatives.

With clipping and a non-fused optimizer, hwoptim zeroes the non-finite gradients of every
update on the device (one ``nan_to_num_`` per gradient tensor), so that a step with an inf
or nan gradient norm never reaches the parameters, without a host sync. This times that
pass on the gradients of the models of ``overhead.py`` and compares it, per update, with:

- ``foreach_mul``: one ``torch._foreach_mul_`` over the same gradients, the multiply the
  clip itself does: the unit of "one elementwise pass";
- ``clip``: ``torch.nn.utils.clip_grad_norm_`` as a whole;
- ``found_inf``: the fixed part of the guard with a fused optimizer,
  ``(norm * 0).nan_to_num_(nan=1.0)`` (the skip count is kept lazily, a list append per
  update, so it costs no device op);
- ``flat``: the one sync-free alternative with the same result in torch's op set: flatten
  the gradients into one buffer, clean it with one ``nan_to_num_`` and copy it back (no
  ``foreach`` op maps nan to 0: ``nan * 0`` is nan and all foreach arithmetic propagates it);
- ``loop_nan_only``: ``nan_to_num_(0.0)``, which maps inf to the largest finite value
  instead of 0. After clipping no inf is left (``inf * 0`` is nan), so it gives the same
  result there; it is shown for its cost, not used.

Interleaved rounds, one thread, median microseconds per update and per tensor, and the
median ratio to ``foreach_mul`` within a round.

Usage::

    python benchmarks/guard.py [--rounds 101]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Callable

import overhead  # the models of the overhead benchmark (same folder)
import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def gradients(kind: str) -> list[nn.Parameter]:
    model = overhead.make_model(kind)
    x, y = overhead.make_batches(kind)[0]
    overhead.loss_fn(model(x), y).backward()
    return list(model.parameters())


def variants(params: list[nn.Parameter]) -> dict[str, Callable[[], object]]:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)

    def loop() -> None:  # hwoptim's guard, as in OptimWrapper.step
        for param in params:
            grad = param.grad
            if grad is not None:
                grad.nan_to_num_(0.0, 0.0, 0.0)

    def loop_nan_only() -> None:
        for param in params:
            grad = param.grad
            if grad is not None:
                grad.nan_to_num_(0.0)

    def flat() -> None:
        current = [p.grad for p in params if p.grad is not None]
        buffer = _flatten_dense_tensors(current)
        buffer.nan_to_num_(0.0, 0.0, 0.0)
        torch._foreach_copy_(current, _unflatten_dense_tensors(buffer, current))

    def found_inf() -> None:
        (norm * 0.0).nan_to_num_(nan=1.0)

    return {
        "foreach_mul": lambda: torch._foreach_mul_(grads, 1.0),
        "clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
        "found_inf": found_inf,
        "loop": loop,
        "flat": flat,
        "loop_nan_only": loop_nan_only,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--repeat", type=int, default=5, help="calls per timed segment")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.repeat} calls")
    header = f"{'model':<6} {'tensors':>7} {'variant':<14} {'us/update':>10} {'us/tensor':>9} " \
             f"{'x foreach_mul':>13}"
    print(header)
    print("-" * len(header))
    results = []
    for kind in ("small", "wide"):
        params = gradients(kind)
        runs = variants(params)
        names = list(runs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for run in runs.values():
            run()
        gc.disable()
        try:
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    start = time.thread_time()
                    for _ in range(args.repeat):
                        runs[name]()
                    times[name].append((time.thread_time() - start) / args.repeat)
        finally:
            gc.enable()
        base = times["foreach_mul"]
        for name in names:
            us = statistics.median(times[name]) * 1e6
            ratio = statistics.median(t / b for t, b in zip(times[name], base))
            print(f"{kind:<6} {len(params):>7} {name:<14} {us:10.1f} {us / len(params):9.2f} "
                  f"{ratio:13.2f}")
            results.append({"model": kind, "tensors": len(params), "variant": name,
                            "us_per_update": round(us, 2), "ratio_to_foreach_mul": round(ratio, 3)})
    print(json.dumps({"benchmark": "hwoptim-guard", "torch": torch.__version__,
                      "rounds": args.rounds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
