"""Running training scenarios on several processes under real torch.distributed (gloo on
CPU), for tests/test_distributed.py (2 ranks) and tests/test_distributed_mesh.py (4 ranks).

The processes are started once per test module (``launch``) and run the scenarios of a
worker module (``tests/_dist_worker.py``, ``tests/_dist_mesh_worker.py``: a ``SCENARIOS``
mapping of name -> ``fn(rank, workdir) -> result``) in a row. Each rank saves each
scenario's result as ``<name>.rank<r>.pt`` in the work folder, where the tests read it
(``Runs``).

Scenarios are independent: each runs in a process group of its own, made for it and
destroyed after it. A scenario that raises on one rank writes ``<name>.rank<r>.err`` with
its traceback; the other ranks, left waiting in a collective, fail too once their peer
has left (or after ``COLLECTIVE_TIMEOUT``), and all of them go on with the next scenario
in a fresh group. So one failure reports itself and nothing else.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hwoptim import get_backend

#: how long a rank waits in a collective for a peer that has failed
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
#: how long a rank waits for the others to finish a scenario (failed ones included)
SCENARIO_TIMEOUT = 120.0



def _fsdp2_missing() -> str | None:
    """What this torch lacks to run FSDP2 on CPU processes (gloo), or None if nothing."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no public torch.distributed.fsdp.fully_shard (FSDP2, torch 2.6+)"
    if not hasattr(torch.cpu.Stream, "record_event"):  # FSDP2 records events on its streams
        return f"torch {torch.__version__}'s FSDP2 cannot run on CPU: torch.cpu.Stream has no record_event"
    # FSDP2 reduces gradients with ReduceOp.AVG: before torch 2.9 gloo's reduce_scatter
    # sums with it (gradients twice too large on 2 ranks), and before 2.8 its all_reduce
    # refuses it. Nothing in Python tells, hence the version.
    if torch.__version__ < (2, 9):  # type: ignore[operator]
        return (
            f"torch {torch.__version__}'s gloo sums where FSDP2 asks reduce_scatter for "
            "ReduceOp.AVG (averages from torch 2.9)"
        )
    return None


#: why FSDP2 (and so HSDP and FSDP2 + tensor parallel) cannot run here, or None
FSDP2_MISSING = _fsdp2_missing()


def runnable(scenarios: Sequence[str]) -> list[str]:
    """The scenarios this torch can run: those of FSDP2 (named fsdp2 or hsdp) only where it
    can run on CPU; their tests skip, saying why (``FSDP2_MISSING``)."""
    return [n for n in scenarios if not (FSDP2_MISSING and ("fsdp2" in n or "hsdp" in n))]


# -- in the pytest process -----------------------------------------------------------------


def launch(
    workdir: Path,
    worker: str,
    scenarios: Sequence[str],
    world_size: int,
    timeout: float = 300.0,
) -> None:
    """Run ``scenarios`` of module ``worker`` on ``world_size`` fresh processes.

    Raises when a process dies or the whole run takes longer than ``timeout``; a scenario
    that merely raises is reported through its ``.err`` files instead.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    # Every rank would spend seconds importing torch and torch._dynamo (DDP imports it);
    # a fork server imports them once, and each launch forks its ranks from it. The fork
    # server never touches torch.distributed or OpenMP, so forking it is safe.
    preload = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.nn.parallel"]
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        [*preload, "hwoptim", "_dist_harness", worker]
    )
    context = mp.start_processes(
        run_rank,
        args=(world_size, str(workdir), worker, list(scenarios), uuid.uuid4().hex),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"distributed scenarios {list(scenarios)} ran past {timeout}s")


class Runs:
    """The results the ranks saved, or why there are none."""

    def __init__(self, workdir: Path, world_size: int, failure: str | None) -> None:
        self.workdir = workdir
        self.world_size = world_size
        self.failure = failure

    def __call__(self, scenario: str) -> list[dict[str, Any]]:
        """Each rank's result of ``scenario``; fails the test with that scenario's errors."""
        import pytest

        paths = [self.workdir / f"{scenario}.rank{r}.pt" for r in range(self.world_size)]
        if all(p.exists() for p in paths):
            return [torch.load(p, weights_only=False) for p in paths]
        errors = "\n".join(
            f"-- {p.name}\n{p.read_text()}" for p in sorted(self.workdir.glob(f"{scenario}.rank*.err"))
        )
        pytest.fail(
            f"scenario {scenario!r} left no result "
            f"({self.failure or 'the processes ran to the end'})\n{errors}"
        )

    @classmethod
    def start(cls, workdir: Path, worker: str, scenarios: Sequence[str], world_size: int) -> Runs:
        """Launch the scenarios; a launch that fails is reported by every test that reads."""
        try:
            launch(workdir, worker, scenarios, world_size)
        except Exception as exc:
            return cls(workdir, world_size, f"the launch failed: {type(exc).__name__}: {exc}")
        return cls(workdir, world_size, None)


# -- in each rank ----------------------------------------------------------------------------


def run_rank(
    rank: int, world_size: int, workdir: str, worker: str, scenarios: list[str], run_id: str
) -> None:
    torch.set_num_threads(1)  # several ranks share a small CI machine
    table = importlib.import_module(worker).SCENARIOS
    folder = Path(workdir)
    for name in scenarios:
        try:
            # A process group per scenario, its store a file in this run's own folder (no
            # TCP port to clash with other runs): a failed scenario leaves nothing behind.
            dist.init_process_group(
                get_backend("cpu").dist_backend,
                init_method=f"file://{folder}/store-{run_id}-{name}",
                rank=rank,
                world_size=world_size,
                timeout=COLLECTIVE_TIMEOUT,
            )
            result = table[name](rank, folder)
            torch.save(result, folder / f"{name}.rank{rank}.pt")
        except Exception:
            (folder / f"{name}.rank{rank}.err").write_text(traceback.format_exc())
        finally:
            with contextlib.suppress(Exception):  # whatever state a failure left it in
                if dist.is_initialized():
                    if _GLOO_RELEASES_WORK_LATE:
                        time.sleep(0.1)
                    dist.destroy_process_group()
            _wait_for_all(folder, f"{run_id}-{name}", rank, world_size)


#: torch before 2.9 (seen on 2.4 to 2.7): gloo's threads drop a finished collective's
#: tensors a moment after its result is out, and need the GIL for it; destroying the
#: group meanwhile holds the GIL and waits for those threads, a deadlock. There is nothing
#: to test for, hence the version; sleeping first lets the threads finish.
_GLOO_RELEASES_WORK_LATE = torch.__version__ < (2, 9)  # type: ignore[operator]


def _wait_for_all(folder: Path, key: str, rank: int, world_size: int) -> None:
    """A barrier outside torch.distributed: it holds after a failure too."""
    (folder / f"done-{key}.rank{rank}").touch()
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    while not all((folder / f"done-{key}.rank{r}").exists() for r in range(world_size)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other ranks did not finish {key} in {SCENARIO_TIMEOUT}s")
        time.sleep(0.005)


# -- counting collectives ------------------------------------------------------------------------


@contextlib.contextmanager
def counting(*names: str) -> Iterator[list[int]]:
    """Count calls of the ``torch.distributed`` functions ``names`` that exist in this torch.

    Callers such as FSDP2 look them up on ``torch.distributed`` at call time, so patching
    the module attribute sees each of their calls once (calls inside torch.distributed
    itself go to the original function and are not counted twice).
    """
    calls = [0]
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    if not originals:
        raise AttributeError(f"torch.distributed has none of {names}")

    def counted(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counted(original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


#: what FSDP2 reduce-scatters gradients through: reduce_scatter_single from torch 2.13,
#: reduce_scatter_tensor before
REDUCE_SCATTER = ("reduce_scatter_single", "reduce_scatter_tensor")


def counting_reduce_scatter() -> contextlib.AbstractContextManager[list[int]]:
    """Count FSDP2's gradient reduce-scatters, whichever function this torch uses."""
    return counting(*REDUCE_SCATTER)


def ddp_with_counter(model: torch.nn.Module, **ddp_kwargs: Any) -> tuple[torch.nn.Module, list[int]]:
    """DDP over ``model`` whose every all-reduce passes a counting comm hook."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, **ddp_kwargs)
    calls = [0]

    # No annotations: DDP checks them, and postponed (string) annotations fail its check.
    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        calls[0] += 1
        # default_hooks.allreduce_hook's work, done synchronously: its Python callback on
        # the collective's future can deadlock older torch (seen on 2.4 to 2.7) when the
        # process group is destroyed while gloo's thread still holds the callback (the
        # destructor keeps the GIL and joins that thread, which waits for the GIL).
        tensor = bucket.buffer().div_(dist.get_world_size())
        dist.all_reduce(tensor)
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(tensor)
        return future

    ddp.register_comm_hook(None, counting_allreduce)
    return ddp, calls
