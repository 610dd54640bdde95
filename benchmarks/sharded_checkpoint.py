"""Sharded (DCP) checkpoints against torch.save of rank 0's full state, on 4 gloo CPU ranks.

    python benchmarks/sharded_checkpoint.py            # ~300 MB of parameters + AdamW state

Each rank holds an FSDP2 model of ``--mb`` MB of fp32 parameters (AdamW: three times that
in all with its two moments), sharded four ways. Timed, in one run, best of ``--repeat``:

- ``dcp save``: ``wrapper.save_sharded`` (every rank writes its shards, checksums included);
- ``dcp async``: ``save_sharded(async_save=True)`` until it returns (training could go on)
  and until its Future is done;
- ``dcp load``: ``wrapper.load_sharded`` (checksums checked, read into fresh buffers, applied);
- ``torch.save``: the full state gathered to rank 0 (``get_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``) and written there; its load: every rank
  ``torch.load``s the whole file (``mmap=True``) and keeps its shards (``set_state_dict``
  with ``full_state_dict=True``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hwoptim import OptimWrapper

WORLD = 4


def build(mb: int) -> tuple[nn.Module, OptimWrapper]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    width = 2048
    layers = max(1, mb * 2**20 // (4 * width * width))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, None)
    for _ in range(2):  # one update: AdamW's moments exist
        with wrapper.optim_context(model):
            loss = model(torch.randn(4, width)).square().mean()
        wrapper.update_params(loss)
    return model, wrapper


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def rank_main(rank: int, folder: str, mb: int, repeat: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    model, wrapper = build(mb)
    root = Path(folder)
    numel = sum(p.numel() for p in model.parameters())  # global numel (DTensors)
    results: dict[str, list[float]] = {k: [] for k in ("dcp save", "dcp async (returns)", "dcp async (done)",
                                                       "dcp load", "torch.save rank 0", "torch.load full, every rank")}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    for i in range(repeat):
        path = root / f"dcp-{i}"
        results["dcp save"].append(timed(lambda path=path: wrapper.save_sharded(path, model)))
        start = time.perf_counter()
        future = wrapper.save_sharded(root / f"async-{i}", model, async_save=True)
        results["dcp async (returns)"].append(time.perf_counter() - start)
        future.result()  # type: ignore[union-attr]
        dist.barrier()
        results["dcp async (done)"].append(time.perf_counter() - start)
        results["dcp load"].append(timed(lambda path=path: wrapper.load_sharded(path, model)))
        file = root / f"full-{i}.pt"

        def save_full(file: Path = file) -> None:
            model_state, optim_state = get_state_dict(model, wrapper.optimizer, options=full)
            if rank == 0:
                state = {"model": model_state, "optim": optim_state, "hwoptim": wrapper.state_dict()["hwoptim"]}
                torch.save(state, file)

        def load_full(file: Path = file) -> None:
            state = torch.load(file, weights_only=True, mmap=True)
            set_state_dict(model, wrapper.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(full_state_dict=True))

        results["torch.save rank 0"].append(timed(save_full))
        results["torch.load full, every rank"].append(timed(load_full))
        for extra in (path, root / f"async-{i}"):
            if rank == 0:
                shutil.rmtree(extra, ignore_errors=True)
        if rank == 0:
            file.unlink()
        dist.barrier()
    if rank == 0:
        size = numel * 4 * 3 / 2**20
        print(f"{WORLD} gloo CPU ranks, FSDP2, {numel / 1e6:.1f} M fp32 parameters + AdamW: "
              f"{size:.0f} MB of state; torch {torch.__version__}; best of {repeat}")
        print("| what | seconds | MB/s |\n|---|---:|---:|")
        for name, times in results.items():
            best = min(times)
            print(f"| {name} | {best:.2f} | {size / best:.0f} |")
        print(json.dumps({k: round(min(v), 3) for k, v in results.items()} | {"state_mb": round(size)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="MB of fp32 parameters (AdamW triples it)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(dir=args.dir)
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.start_processes(rank_main, args=(folder, args.mb, args.repeat), nprocs=WORLD, start_method="spawn")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
