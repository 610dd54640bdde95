"""Distributed training for real: DDP and FSDP2 on 2 CPU processes (gloo), FSDP1 through a
recording stand-in (torch 2.13 builds FSDP1 only on an accelerator) and on a GPU where
there is one.

What is proved: accumulation skips the gradient collective on every micro-batch that does
not update (collectives counted where torch issues them), with mmengine's calling pattern,
with the loop body inside ``optim_context`` and through torch.compile; clipping uses the
global norm; the sharded loss scaler keeps every rank in step; a checkpoint resumes
exactly; item-weighted accumulation (num_items) sums the counts over the ranks in one
all-reduce per update. Parameters are compared with one process training on the concatenated batches.

The processes are started twice per session (once for everything, once more to resume
from a checkpoint in fresh processes); see tests/_dist_worker.py for what each rank runs
and tests/_dist_harness.py for how (each scenario on its own: one failure reports itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_harness import FSDP2_MISSING, Runs
from _dist_worker import (
    ACC,
    CLIP,
    EXAMPLE_STEPS,
    FIRST_LAUNCH,
    INF_AT,
    INF_ITERS,
    N_ITERS,
    RESUME_ACC,
    RESUME_AT,
    RESUME_MID_AT,
    RESUMED,
    SYNCED,
    WORLD_SIZE,
    batch,
    fsdp1_gpu_rank,
    fused_adamw,
    items_batch,
    items_loss,
    loss_fn,
    make_model,
    params_of,
    sgd,
    train,
)
from torch import nn

from hwoptim import OptimWrapper

UPDATES = sum(SYNCED)  # 3 updates in 7 micro-batches with windows of 3
#: FSDP2 reduce-scatters once per sharded parameter group: the two Linear layers
FSDP2_GROUPS = 2

distributed = pytest.mark.dist
needs_fsdp2 = pytest.mark.skipif(FSDP2_MISSING is not None, reason=str(FSDP2_MISSING))


def sharded(*case: Any) -> Any:
    """A parametrize case of an FSDP2 scenario: skipped where FSDP2 cannot run."""
    return pytest.param(*case, marks=needs_fsdp2)


# -- running the ranks once, reading their results -------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs.start(tmp_path_factory.mktemp("dist"), "_dist_worker", FIRST_LAUNCH, WORLD_SIZE)


@pytest.fixture(scope="module")
def resumed(runs: Runs) -> Runs:
    """Fresh processes that load the checkpoint the first launch saved and finish the run."""
    if not (runs.workdir / "ckpt.pt").exists():
        return Runs(runs.workdir, WORLD_SIZE, runs.failure or "the first launch saved no checkpoint")
    return Runs.start(runs.workdir, "_dist_worker", RESUMED, WORLD_SIZE)


# -- single-process references ---------------------------------------------------------------------


def reference(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    iters: Sequence[int],
    accumulative_counts: int = 1,
    clip_grad: dict[str, Any] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, grad norm at each update) of one process on the concatenated batches."""
    model = make_model()
    wrapper = OptimWrapper(make_optimizer(model), accumulative_counts, clip_grad)
    wrapper.initialize_count_status(model, 0, len(iters))
    norms = []
    for i in iters:
        train(wrapper, model, [i], rank=None)
        if wrapper.should_update() and wrapper.last_grad_norm is not None:
            norms.append(wrapper.last_grad_norm.clone())
    return params_of(model), norms


def assert_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# -- DDP -------------------------------------------------------------------------------------------

DDP_RUNS = ["ddp_mmengine", "ddp_inside", "ddp_compiled"]


@distributed
@pytest.mark.parametrize("scenario", DDP_RUNS)
def test_ddp_all_reduces_only_on_micro_batches_that_update(runs: Runs, scenario: str) -> None:
    # The model fits one DDP bucket: one all-reduce (one comm-hook call) per synced backward.
    for result in runs(scenario):
        assert result["collectives"] == [int(s) for s in SYNCED]
        assert sum(result["collectives"]) == UPDATES


@distributed
@pytest.mark.parametrize("scenario", DDP_RUNS)
def test_ddp_accumulation_equals_one_process_on_the_concatenated_batches(
    runs: Runs, scenario: str
) -> None:
    want, _ = reference(sgd, range(N_ITERS), ACC)
    for result in runs(scenario):
        assert_close(result["params"], want)


# -- FSDP2 -----------------------------------------------------------------------------------------

FSDP2_RUNS = ["fsdp2_mmengine", "fsdp2_inside", "fsdp2_submodules", "fsdp2_compiled"]


@distributed
@needs_fsdp2
@pytest.mark.parametrize("scenario", FSDP2_RUNS)
def test_fsdp2_reduce_scatters_only_on_micro_batches_that_update(
    runs: Runs, scenario: str
) -> None:
    for result in runs(scenario):
        assert result["collectives"] == [FSDP2_GROUPS * s for s in SYNCED]
        assert sum(result["collectives"]) == FSDP2_GROUPS * UPDATES


@distributed
@needs_fsdp2
@pytest.mark.parametrize("scenario", FSDP2_RUNS)
def test_fsdp2_gradient_sync_is_back_on_after_the_loop(runs: Runs, scenario: str) -> None:
    for result in runs(scenario):
        assert result["after_loop"] == FSDP2_GROUPS


@distributed
@needs_fsdp2
def test_fsdp2_gradient_sync_is_back_on_for_every_shard_after_an_error_inside_no_sync(runs: Runs) -> None:
    for result in runs("fsdp2_error_inside_no_sync"):
        assert result["inside"] == 0  # the skip did skip
        assert result["after_error"] == FSDP2_GROUPS  # every shard synchronises again


@distributed
@needs_fsdp2
@pytest.mark.parametrize("scenario", FSDP2_RUNS)
def test_fsdp2_clipping_by_the_global_norm_equals_one_process(runs: Runs, scenario: str) -> None:
    want, want_norms = reference(sgd, range(N_ITERS), ACC, CLIP)
    assert max(want_norms) > CLIP["max_norm"]  # clipping really changed the gradients
    for result in runs(scenario):
        assert_close(result["params"], want)


@distributed
@needs_fsdp2
def test_fsdp2_last_grad_norm_is_a_plain_tensor_with_the_global_value(runs: Runs) -> None:
    _, want_norms = reference(sgd, range(N_ITERS), ACC, CLIP)
    for result in runs("fsdp2_mmengine"):
        assert result["norm_types"] == ["Tensor"] * UPDATES  # not a DTensor
        assert_close(result["norms"], want_norms)


@distributed
@needs_fsdp2
def test_fsdp2_fp16_use_fsdp_gives_the_sharded_scaler(runs: Runs) -> None:
    for result in runs("fsdp2_fp16_sharded_scaler"):
        assert result["scaler"] == "torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler"


@distributed
@needs_fsdp2
def test_fsdp2_fp16_an_inf_on_one_rank_skips_the_step_on_all(runs: Runs) -> None:
    skipped_step = [i != INF_AT for i in range(INF_ITERS)]
    for result in runs("fsdp2_fp16_sharded_scaler"):
        assert result["changed"] == skipped_step
        assert result["skipped"] == 1.0


@distributed
@needs_fsdp2
def test_fsdp2_fp16_loss_scale_is_identical_on_every_rank(runs: Runs) -> None:
    scales = [result["scales"] for result in runs("fsdp2_fp16_sharded_scaler")]
    assert scales[0] == scales[1]
    # backs off once, at the overflow, on both ranks
    assert scales[0] == [256.0, 256.0, 128.0, 128.0]


@distributed
@needs_fsdp2
def test_fsdp2_fused_optimizer_skips_an_inf_on_one_rank_on_all(runs: Runs) -> None:
    for result in runs("fsdp2_fused_overflow"):
        assert result["changed"] == [i != INF_AT for i in range(INF_ITERS)]
        assert result["skipped"] == 1.0
        kinds, values = zip(*result["norms"])
        assert set(kinds) == {"Tensor"}
        assert [v == float("inf") for v in values] == [i == INF_AT for i in range(INF_ITERS)]


@distributed
@needs_fsdp2
def test_fsdp2_fused_optimizer_ends_where_one_process_without_the_bad_step_ends(
    runs: Runs,
) -> None:
    good = [i for i in range(INF_ITERS) if i != INF_AT]
    want, _ = reference(fused_adamw, good, clip_grad=dict(max_norm=1.0))
    for result in runs("fsdp2_fused_overflow"):
        assert_close(result["params"], want)


# -- item-weighted accumulation (num_items) ------------------------------------------------------

#: ddp_num_items_one_element: the loss and the tensor count of shape (1,), not 0-dim
ITEMS_RUNS = [
    "ddp_num_items", "ddp_num_items_one_element", sharded("fsdp2_num_items"),
    sharded("hsdp_num_items"),
]


def items_reference() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(params, window losses, grad norms) of plain torch in one process: per window, the
    sum of the item losses of every rank's micro-batches divided by their item count."""
    model = make_model()
    optimizer = sgd(model)
    losses, norms = [], []
    for start in range(0, N_ITERS, ACC):
        batches = [
            items_batch(i, r) for i in range(start, min(start + ACC, N_ITERS))
            for r in range(WORLD_SIZE)
        ]
        total = sum(items_loss(model(x), y) for x, y in batches)
        loss = total / sum(len(x) for x, _ in batches)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP["max_norm"]))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return params_of(model), losses, norms


@distributed
@pytest.mark.parametrize("scenario", ITEMS_RUNS)
def test_num_items_over_ranks_equals_one_process_on_all_items_of_each_window(
    runs: Runs, scenario: str
) -> None:
    """Micro-batches of 1 to 5 rows, different on the two ranks; clipping by the global
    norm; a remainder window of one micro-batch."""
    want, want_losses, norms = items_reference()
    assert max(norms) > CLIP["max_norm"]  # clipping changed the gradients
    for result in runs(scenario):
        assert_close(result["params"], want)
        assert_close(result["last_loss"], want_losses)  # the same on every rank


@distributed
@pytest.mark.parametrize(
    ("scenario", "grad_collectives", "all_reduces"),
    [
        # DDP: one bucket all-reduce (through dist.all_reduce) and the count's
        ("ddp_num_items", 1, 2),
        # FSDP2: reduce-scatters per Linear; the clip's norm (one all-reduce for all the
        # groups, hwoptim/_grad_norm.py) and the count's
        sharded("fsdp2_num_items", FSDP2_GROUPS, 2),
        # HSDP (replicate 2, shard 1): an all-reduce per Linear over replicas, the clip's
        # norm (one all-reduce over the mesh, hwoptim/_grad_norm.py), and the count's
        # (no reduce-scatter over a shard group of one; torch 2.9 and older still run it)
        sharded("hsdp_num_items", (0, FSDP2_GROUPS), FSDP2_GROUPS + 2),
    ],
)
def test_num_items_adds_one_all_reduce_per_update_and_none_while_accumulating(
    runs: Runs, scenario: str, grad_collectives: int | tuple[int, ...], all_reduces: int
) -> None:
    allowed = grad_collectives if isinstance(grad_collectives, tuple) else (grad_collectives,)
    for result in runs(scenario):
        assert any(result["grad_collectives"] == [n * s for s in SYNCED] for n in allowed)
        assert result["all_reduces"] == [all_reduces * s for s in SYNCED]


@distributed
@needs_fsdp2
def test_num_items_with_fp16_and_the_sharded_scaler_is_close_to_one_process(runs: Runs) -> None:
    want, want_losses, _ = items_reference()
    for result in runs("fsdp2_fp16_num_items"):
        assert result["skipped"] == 0.0
        assert result["grad_collectives"] == [FSDP2_GROUPS * s for s in SYNCED]
        for got, ref in zip(result["params"], want):  # fp16 autocast rounding
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=2e-3)
        torch.testing.assert_close(result["last_loss"], want_losses, rtol=1e-2, atol=1e-3)


@distributed
@needs_fsdp2
def test_hsdp_sums_item_counts_in_one_collective_over_every_replica_and_shard(runs: Runs) -> None:
    for result in runs("hsdp_num_items"):
        assert result["reduction"] == "ItemsReduction(groups=(None,), divisor=2.0)"


# -- resume ----------------------------------------------------------------------------------------


@distributed
def test_ddp_resume_from_a_checkpoint_in_fresh_processes_ends_at_the_same_params(
    runs: Runs, resumed: Runs
) -> None:
    uninterrupted = runs("ddp_uninterrupted")
    assert [r["inner_count"] for r in runs("ddp_checkpoint")] == [RESUME_AT] * WORLD_SIZE
    for got, want in zip(resumed("ddp_resumed"), uninterrupted):
        assert got["resumed_at"] == RESUME_AT
        assert got["scale"] == want["scale"]
        for g, w in zip(got["params"], want["params"]):
            assert torch.equal(g, w)


@distributed
def test_ddp_resume_inside_a_window_from_each_ranks_own_checkpoint_is_exact(
    runs: Runs, resumed: Runs
) -> None:
    """save_partial_grads: each rank saves its own partial gradients and resumes from them."""
    uninterrupted = runs("ddp_uninterrupted")
    saved = runs("ddp_checkpoint_mid")
    assert [r["grads_rank"] for r in saved] == list(range(len(saved)))
    assert all(r["saved_grads"] == 4 for r in saved)  # two Linear layers: weight and bias
    for got, want in zip(resumed("ddp_resumed_mid"), uninterrupted):
        assert got["warnings"] == []  # nothing lost, so no "not divisible" warning
        assert got["scale"] == want["scale"]
        for g, w in zip(got["params"], want["params"]):
            assert torch.equal(g, w)


@distributed
def test_ddp_rank0_partial_grads_are_not_loaded_on_another_rank(runs: Runs, resumed: Runs) -> None:
    """What mmengine's CheckpointHook leaves (rank 0's file): rank 1 must not count rank 0's
    micro-batches as its own; it warns and resumes as without saved gradients."""
    results = resumed("ddp_resumed_mid")
    assert results[0]["rank0_file_warnings"] == [] and all(results[0]["rank0_file_grads"])
    for result in results[1:]:
        assert any("saved by data-parallel rank 0" in w for w in result["rank0_file_warnings"])
        assert not any(result["rank0_file_grads"])
    assert RESUME_MID_AT % RESUME_ACC != 0  # the checkpoint is inside a window


# -- FSDP1: a recording stand-in on CPU, the real thing on a GPU -----------------------------------


class RecordingFSDP1(nn.Module):
    """Stands in for FullyShardedDataParallel: its ``no_sync()`` and ``clip_grad_norm_``
    record when they run, and a gradient hook records whether ``no_sync`` was in effect
    while the backward ran (FSDP1 reads its flag there)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.syncing = True
        self.backward_syncing: list[bool] = []
        self.clip_calls: list[tuple[float, float, bool]] = []
        module[0].weight.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self.backward_syncing.append(self.syncing)
        return grad

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        self.clip_calls.append((max_norm, norm_type, self.syncing))
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, norm_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _train_fsdp1_stand_in(pattern: str, compiled: bool) -> tuple[RecordingFSDP1, OptimWrapper]:
    fsdp = RecordingFSDP1(make_model())
    runner = torch.compile(fsdp, backend="eager") if compiled else fsdp
    wrapper = OptimWrapper(sgd(fsdp), accumulative_counts=ACC, clip_grad=CLIP)
    wrapper.initialize_count_status(runner, 0, N_ITERS)
    train(wrapper, runner, range(N_ITERS), rank=None, pattern=pattern)
    return fsdp, wrapper


@pytest.mark.parametrize(
    ("pattern", "compiled"), [("mmengine", False), ("inside", False), ("mmengine", True)]
)
def test_fsdp1_backward_runs_inside_no_sync_on_micro_batches_that_do_not_update(
    pattern: str, compiled: bool
) -> None:
    fsdp, _ = _train_fsdp1_stand_in(pattern, compiled)
    assert fsdp.backward_syncing == SYNCED
    assert fsdp.syncing is True  # nothing left switched off after the loop


def test_fsdp1_clips_through_the_module_clip_grad_norm() -> None:
    fsdp, wrapper = _train_fsdp1_stand_in("mmengine", compiled=False)
    # once per update, outside no_sync, with the configured norm
    assert fsdp.clip_calls == [(CLIP["max_norm"], 2.0, True)] * UPDATES
    want, want_norms = reference(sgd, range(N_ITERS), ACC, CLIP)
    assert_close(params_of(fsdp.module), want)
    assert wrapper.last_grad_norm is not None
    assert_close([wrapper.last_grad_norm], want_norms[-1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp1_on_gpus_skips_collectives_while_accumulating_and_clips_globally(
    tmp_path: Path,
) -> None:
    import torch.multiprocessing as mp

    world_size = min(WORLD_SIZE, torch.cuda.device_count())
    mp.spawn(
        fsdp1_gpu_rank,
        args=(world_size, str(tmp_path / "store"), str(tmp_path)),
        nprocs=world_size,
    )
    # the reference: one process on the batches of all the ranks that ran
    model = make_model()
    wrapper = OptimWrapper(sgd(model), accumulative_counts=ACC, clip_grad=CLIP)
    wrapper.initialize_count_status(model, 0, N_ITERS)
    for i in range(N_ITERS):
        xs, ys = zip(*(batch(i, r) for r in range(world_size)))
        with wrapper.optim_context(model):
            loss = loss_fn(model(torch.cat(xs)), torch.cat(ys))
        wrapper.update_params(loss)
    want = model.state_dict()
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        counts = result["collectives"]
        # no collective while accumulating (one GPU: FSDP1 may not communicate at all)
        assert [c for c, synced in zip(counts, SYNCED) if not synced] == [0] * (N_ITERS - UPDATES)
        if world_size > 1:
            assert all(c > 0 for c, synced in zip(counts, SYNCED) if synced)
        assert result["state"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5)


# -- the examples ----------------------------------------------------------------------------------

#: what rank 0 of an example prints last (windows of 2 micro-batches)
EXAMPLE_DONE = (
    f"done: {EXAMPLE_STEPS} micro-batches, {EXAMPLE_STEPS // 2} updates on 2 cpu processes (gloo)"
)


@distributed
@pytest.mark.parametrize("example", ["ddp.py", sharded("fsdp2.py")])
def test_example_trains_on_two_processes_with_the_backends_collective_library(
    runs: Runs, example: str
) -> None:
    """examples/ddp.py and examples/fsdp2.py, run in both ranks (test_examples skips them)."""
    rank0, rank1 = runs(f"example_{example.removesuffix('.py')}")
    assert rank0["init_args"] == rank1["init_args"] == [("gloo",)]  # from backend.dist_backend
    assert EXAMPLE_DONE in rank0["stdout"]
    assert rank1["stdout"] == ""  # only rank 0 reports
