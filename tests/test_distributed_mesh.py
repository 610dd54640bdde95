"""Distributed training on 4 processes (gloo): the meshes and DDP set-ups 2 ranks cannot show.

- HSDP on a (replicate 2, shard 2) mesh and FSDP2 + tensor parallel on a (dp 2, tp 2) mesh,
  in both calling patterns: no gradient collective on the micro-batches that do not
  update, parameters equal to one process on the data-parallel ranks' batches, and
  ``last_grad_norm`` the global norm, a plain tensor, the same on every rank.
- HSDP with a fault on one replica after the gradients were reduced: every rank skips
  the step (the norm is one all-reduce over the whole mesh, hwoptim/_grad_norm.py).
- DDP with a frozen and an unused layer (find_unused_parameters=True), and DDP with
  static_graph=True (torch cannot start one under no_sync(); hwoptim synchronises its
  first micro-batch) over many windows: an all-reduce at every update, the reference's
  parameters.

The 4 processes are started once for the whole module; see tests/_dist_mesh_worker.py
for what each rank runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from _dist_harness import FSDP2_MISSING, Runs, runnable
from _dist_mesh_worker import (
    ACC,
    CLIP,
    FAULT_RUNS,
    INF_AT,
    INF_ITERS,
    N_ITERS,
    SCENARIOS,
    STATIC_ITERS,
    SYNCED,
    WORLD_SIZE,
    FrozenAndUnused,
    reference,
)
from _dist_worker import params_of, sgd

pytestmark = pytest.mark.dist
needs_fsdp2 = pytest.mark.skipif(FSDP2_MISSING is not None, reason=str(FSDP2_MISSING))

#: FSDP2 reduces each sharded parameter group (the two Linear layers) once per update
GROUPS = 2
PATTERNS = ["mmengine", "inside"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs.start(tmp_path_factory.mktemp("mesh"), "_dist_mesh_worker", runnable(SCENARIOS), WORLD_SIZE)


def assert_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def on_updates(per_update: int) -> list[int]:
    return [per_update if synced else 0 for synced in SYNCED]


# -- HSDP and FSDP2 + tensor parallel --------------------------------------------------------------

#: data-parallel ranks of each mesh: HSDP's 4, (dp 2, tp 2)'s 2
DP_SIZE = {"hsdp": 4, "fsdp2_tp": 2}
#: all-reduces per update: HSDP's replicas reduce each group, and on every mesh of two
#: dimensions the norm is one all-reduce over the whole mesh (hwoptim/_grad_norm.py)
ALL_REDUCES = {"hsdp": GROUPS + 1, "fsdp2_tp": 1}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", ["hsdp", "fsdp2_tp"])
@needs_fsdp2
def test_mesh_gradient_collectives_run_only_on_micro_batches_that_update(
    runs: Runs, kind: str, pattern: str
) -> None:
    for result in runs(f"{kind}_{pattern}"):
        assert result["reduce_scatters"] == on_updates(GROUPS)
        assert result["all_reduces"] == on_updates(ALL_REDUCES[kind])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", ["hsdp", "fsdp2_tp"])
@needs_fsdp2
def test_mesh_training_equals_one_process_on_the_data_parallel_batches(
    runs: Runs, kind: str, pattern: str
) -> None:
    want, want_norms = reference(sgd, range(N_ITERS), DP_SIZE[kind], ACC, CLIP)
    assert max(want_norms) > CLIP["max_norm"]  # clipping really changed the gradients
    for result in runs(f"{kind}_{pattern}"):
        assert_close(result["params"], want)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", ["hsdp", "fsdp2_tp"])
@needs_fsdp2
def test_mesh_last_grad_norm_is_the_global_norm_on_every_rank(
    runs: Runs, kind: str, pattern: str
) -> None:
    _, want_norms = reference(sgd, range(N_ITERS), DP_SIZE[kind], ACC, CLIP)
    results = runs(f"{kind}_{pattern}")
    for result in results:
        assert result["norm_types"] == ["Tensor"] * len(want_norms)  # not a DTensor
        assert_close(result["norms"], want_norms)
    assert all(torch.equal(torch.stack(r["norms"]), torch.stack(results[0]["norms"])) for r in results)


# -- HSDP: a fault on one replica ------------------------------------------------------------------


@pytest.mark.parametrize("run", list(FAULT_RUNS))
@needs_fsdp2
def test_hsdp_a_fault_on_one_replica_after_the_reduce_skips_the_step_on_every_rank(
    runs: Runs, run: str
) -> None:
    results = runs(f"hsdp_fault_{run}")
    for result in results:
        assert result["changed"] == [i != INF_AT for i in range(INF_ITERS)]
        # a fused optimizer skips for real; plain SGD steps with zeroed gradients (which
        # leaves it where it was: no momentum, no weight decay), counted apart
        counts = (result["skipped"], result["zeroed"])
        assert counts == ((1.0, 0.0) if run == "fused" else (0.0, 1.0))
    # the norm is one all-reduce over the whole mesh: every rank sees the faulty replica's inf
    assert [r["norms"][INF_AT] for r in results] == [float("inf")] * 4
    for result in results[1:]:  # the replicas never part
        for got, want in zip(result["params"], results[0]["params"]):
            assert torch.equal(got, want)


@pytest.mark.parametrize("run", list(FAULT_RUNS))
@needs_fsdp2
def test_hsdp_after_the_skipped_fault_training_goes_on_as_without_the_bad_step(
    runs: Runs, run: str
) -> None:
    make_optimizer, clip_grad = FAULT_RUNS[run]
    good = [i for i in range(INF_ITERS) if i != INF_AT]
    want, _ = reference(make_optimizer, good, dp_size=4, clip_grad=clip_grad)
    for result in runs(f"hsdp_fault_{run}"):
        assert_close(result["params"], want)


# -- DDP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS)
def test_ddp_with_frozen_and_unused_parameters_all_reduces_only_on_updates(
    runs: Runs, pattern: str
) -> None:
    for result in runs(f"ddp_frozen_unused_{pattern}"):
        assert result["collectives"] == on_updates(1)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_ddp_with_frozen_and_unused_parameters_equals_one_process(runs: Runs, pattern: str) -> None:
    model = FrozenAndUnused()
    untouched = params_of(model)
    want, _ = reference(sgd, range(N_ITERS), 4, ACC, model=model)
    for result in runs(f"ddp_frozen_unused_{pattern}"):
        assert_close(result["params"], want)
    names = [name for name, _ in model.named_parameters()]
    for name, before, after in zip(names, untouched, want):
        # the frozen and the unused layers never move; the body does
        assert torch.equal(before, after) == name.startswith(("frozen", "unused")), name


#: static graph: windows of 3 and a last one of 2; the first micro-batch synchronises too
STATIC_SYNCED = [1, 0, 1] + [0, 0, 1] * ((STATIC_ITERS - 2) // ACC - 1) + [0, 1]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_static_graph_ddp_all_reduces_at_every_update_of_many_windows(
    runs: Runs, pattern: str
) -> None:
    assert len(STATIC_SYNCED) == STATIC_ITERS
    for result in runs(f"ddp_static_graph_{pattern}"):
        assert result["collectives"] == STATIC_SYNCED


@pytest.mark.parametrize("pattern", PATTERNS)
def test_static_graph_ddp_with_accumulation_equals_one_process(runs: Runs, pattern: str) -> None:
    want, _ = reference(sgd, range(STATIC_ITERS), 4, ACC)
    for result in runs(f"ddp_static_graph_{pattern}"):
        assert_close(result["params"], want)


# -- the harness -----------------------------------------------------------------------------------


def test_a_scenario_failing_on_one_rank_reports_itself_and_the_next_ones_still_run(
    runs: Runs,
) -> None:
    with pytest.raises(pytest.fail.Exception, match="a deliberate failure on rank 1"):
        runs("fails_on_one_rank")
    assert runs.failure is None
    assert next(iter(SCENARIOS)) == "fails_on_one_rank"  # every other scenario ran after it
    assert len(runs("ddp_frozen_unused_mmengine")) == WORLD_SIZE  # runs on every torch
