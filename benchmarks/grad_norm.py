"""What hwoptim's gradient-norm engine (hwoptim/_grad_norm.py) costs on one process.

The clip now computes its norm with ``grad_norms``, which also returns the norm of each
param group in the same pass. On the gradients of the models of ``overhead.py`` (plain
tensors, one process) this times, per update:

- ``today``: what hwoptim's clip did before the engine: ``get_total_norm`` then
  ``clip_grads_with_norm_`` (torch's ``clip_grad_norm_`` in two halves): the baseline;
- ``clip``: hwoptim's clip function now (``ClipGrad(...).clip_fn()``), the engine inside;
- ``total``: ``torch.nn.utils.get_total_norm`` alone;
- ``norms_1``: ``grad_norms`` over one group (the clip's call);
- ``norms_2``: ``grad_norms`` over 2 groups (weights, biases: a typical no-decay split);
- ``norms_layer``: ``grad_norms`` with each layer's tensors a group of their own.

Interleaved rounds, one thread, median microseconds per update, and the median ratio to
``today`` (the clips) or to ``total`` (the norms alone) within a round.

Usage::

    python benchmarks/grad_norm.py [--rounds 101]
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

from hwoptim._grad_norm import grad_norms
from hwoptim.clip import ClipGrad

#: each variant's baseline in the ratio column
BASE = {"today": "today", "clip": "today", "total": "total", "norms_1": "total",
        "norms_2": "total", "norms_layer": "total"}


def gradients(kind: str) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    """The model's parameters (with gradients) and its gradients grouped by layer."""
    model = overhead.make_model(kind)
    x, y = overhead.make_batches(kind)[0]
    overhead.loss_fn(model(x), y).backward()
    layers = [
        [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        for module in model.modules()
    ]
    return list(model.parameters()), [layer for layer in layers if layer]


def variants(params: list[nn.Parameter], layers: list[list[torch.Tensor]]) -> dict[str, Callable[[], object]]:
    grads = [p.grad for p in params if p.grad is not None]
    split = [[g for g in grads if g.dim() > 1], [g for g in grads if g.dim() <= 1]]
    clip = ClipGrad(dict(max_norm=1e9)).clip_fn()

    def today() -> None:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        torch.nn.utils.clip_grads_with_norm_(params, 1e9, norm)

    return {
        "today": today,
        "clip": lambda: clip(params),
        "total": lambda: torch.nn.utils.get_total_norm(grads, 2.0),
        "norms_1": lambda: grad_norms([grads]),
        "norms_2": lambda: grad_norms(split),
        "norms_layer": lambda: grad_norms(layers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--repeat", type=int, default=5, help="calls per timed segment")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.repeat} calls")
    header = f"{'model':<6} {'tensors':>7} {'groups':>6} {'variant':<12} {'us/update':>10} {'ratio':>6} base"
    print(header)
    print("-" * len(header))
    results = []
    for kind in ("small", "wide"):
        params, layers = gradients(kind)
        runs = variants(params, layers)
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
        for name in names:
            us = statistics.median(times[name]) * 1e6
            base = times[BASE[name]]
            ratio = statistics.median(t / b for t, b in zip(times[name], base))
            groups = {"norms_2": 2, "norms_layer": len(layers)}.get(name, 1)
            print(f"{kind:<6} {len(params):>7} {groups:>6} {name:<12} {us:10.1f} {ratio:6.2f} {BASE[name]}")
            results.append({"model": kind, "tensors": len(params), "groups": groups, "variant": name,
                            "us_per_update": round(us, 2), "ratio": round(ratio, 3),
                            "base": BASE[name]})
    print(json.dumps({"benchmark": "hwoptim-grad-norm", "torch": torch.__version__,
                      "rounds": args.rounds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
