"""What hwoptim's gradient-norm engine (hwoptim/_grad_norm.py) costs on one process.

The clip computes its norm with the engine, which also returns the norm of each param
group in the same pass (``wrapper.last_grad_norms``). On the gradients of the models of
``overhead.py`` (one process) this times, per update:

- ``today``: torch's clip, ``get_total_norm`` then ``clip_grads_with_norm_`` (torch's
  ``clip_grad_norm_`` in two halves): the baseline of every ``clip*`` and ``mesh*`` row;
- ``clip``: hwoptim's clip function (``ClipGrad(...).clip_fn()``), one group;
- ``clip_groups_2``: the same with 2 named groups (weights, biases: a no-decay split), as
  the wrapper calls it: the total and ``last_grad_norms``;
- ``clip_groups_layer``: the same with a group per layer;
- ``clip_per_group``: ``per_group=True`` clipping, a group per layer;
- ``torch_mesh``: torch's clip (as ``today``) over DTensor gradients on one mesh, on a
  one-rank gloo group: the baseline of the ``mesh*`` rows;
- ``mesh_1``, ``mesh_2``: hwoptim's clip over the same DTensors on one mesh, and split over
  two meshes (the mixed-mesh path of part 1, which torch's clip refuses), two groups: what
  the DTensor path costs in Python and dispatch (no collective runs on one rank);
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
from hwoptim.clip import ClipGrad, GroupLayout

#: each variant's baseline in the ratio column
BASE = {"today": "today", "clip": "today", "clip_groups_2": "today", "clip_groups_layer": "today",
        "clip_per_group": "today", "torch_mesh": "torch_mesh", "mesh_1": "torch_mesh",
        "mesh_2": "torch_mesh", "total": "total",
        "norms_1": "total", "norms_2": "total", "norms_layer": "total"}


def gradients(kind: str) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """The model's parameters (with gradients), and the same grouped by layer."""
    model = overhead.make_model(kind)
    x, y = overhead.make_batches(kind)[0]
    overhead.loss_fn(model(x), y).backward()
    layers = [
        [p for p in module.parameters(recurse=False) if p.grad is not None]
        for module in model.modules()
    ]
    return list(model.parameters()), [layer for layer in layers if layer]


def _layout(groups: list[list[nn.Parameter]], clip: ClipGrad | None = None) -> tuple[list[nn.Parameter], GroupLayout]:
    """The flat parameter list of ``groups`` and its layout, as the wrapper keeps them."""
    flat = [p for group in groups for p in group]
    return flat, GroupLayout([{"params": group, "name": f"g{i}"} for i, group in enumerate(groups)], flat, clip)


def _mesh_params(params: list[nn.Parameter], meshes: int) -> list[nn.Parameter]:
    """Copies of ``params`` as DTensors (with DTensor gradients) on ``meshes`` 1-rank meshes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    made = [init_device_mesh("cpu", (1,), mesh_dim_names=(f"m{i}",)) for i in range(meshes)]
    out = []
    for i, p in enumerate(params):
        mesh = made[i % meshes]
        q = nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Replicate()]))
        assert p.grad is not None
        q.grad = distribute_tensor(p.grad.clone(), mesh, [Replicate()])
        out.append(q)
    return out


def variants(params: list[nn.Parameter], layers: list[list[nn.Parameter]]) -> dict[str, Callable[[], object]]:
    grads = [p.grad for p in params if p.grad is not None]
    split = [[g for g in grads if g.dim() > 1], [g for g in grads if g.dim() <= 1]]
    layer_grads = [[p.grad for p in layer] for layer in layers]
    config = ClipGrad(dict(max_norm=1e9))
    clip = config.clip_fn()
    per_group = ClipGrad(dict(max_norm=1e9, per_group=True))
    two = _layout([[p for p in params if p.dim() > 1], [p for p in params if p.dim() <= 1]])
    by_layer = _layout(layers)
    by_layer_clipped = _layout(layers, per_group)
    clip_groups = per_group.clip_fn()
    mesh_1 = _mesh_params(params, 1)
    mesh_2 = _mesh_params(params, 2)
    mesh_2_layout = _layout([mesh_2[0::2], mesh_2[1::2]])

    def today() -> None:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        torch.nn.utils.clip_grads_with_norm_(params, 1e9, norm)

    mesh_grads = [p.grad for p in mesh_1]

    def torch_mesh() -> None:
        norm = torch.nn.utils.get_total_norm(mesh_grads, 2.0)
        torch.nn.utils.clip_grads_with_norm_(mesh_1, 1e9, norm)

    return {
        "today": today,
        "clip": lambda: clip(params),
        "clip_groups_2": lambda: clip(*two),
        "clip_groups_layer": lambda: clip(*by_layer),
        "clip_per_group": lambda: clip_groups(*by_layer_clipped),
        "torch_mesh": torch_mesh,
        "mesh_1": lambda: clip(mesh_1),
        "mesh_2": lambda: clip(*mesh_2_layout),
        "total": lambda: torch.nn.utils.get_total_norm(grads, 2.0),
        "norms_1": lambda: grad_norms([grads]),
        "norms_2": lambda: grad_norms(split),
        "norms_layer": lambda: grad_norms(layer_grads),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--repeat", type=int, default=5, help="calls per timed segment")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    if not dist.is_initialized():  # one rank: the DTensor rows need a process group
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    print(f"# torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.repeat} calls")
    header = f"{'model':<6} {'tensors':>7} {'groups':>6} {'variant':<17} {'us/update':>10} {'ratio':>6} base"
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
            groups = {"norms_2": 2, "clip_groups_2": 2, "mesh_2": 2, "norms_layer": len(layers),
                      "clip_groups_layer": len(layers), "clip_per_group": len(layers)}.get(name, 1)
            print(f"{kind:<6} {len(params):>7} {groups:>6} {name:<17} {us:10.1f} {ratio:6.2f} {BASE[name]}")
            results.append({"model": kind, "tensors": len(params), "groups": groups, "variant": name,
                            "us_per_update": round(us, 2), "ratio": round(ratio, 3),
                            "base": BASE[name]})
    print(json.dumps({"benchmark": "hwoptim-grad-norm", "torch": torch.__version__,
                      "rounds": args.rounds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
