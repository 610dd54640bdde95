"""The global gradient norm over DTensors on several meshes, for real on 4 gloo ranks.

- Every placement (FSDP2's Shard, uneven and empty shards included; experts'
  [Shard(1), Shard(0)] on a (2, 2) mesh; HSDP's [Replicate, Shard]; Partial; a 2-rank
  sub-mesh; a plain tensor; an empty group): the total and per-group norms by
  ``grad_norms`` are the norms of the full tensors, for p = 2, 3 and inf, foreach or
  not, the same on every rank, in one all-reduce per set of ranks, with no host sync.
- One replica's copy going inf or nan: every rank sees it.
- Training with clipping: a Linear under FSDP2 on 4 ranks beside an expert weight on a
  (2, 2) mesh and a plain parameter (the layout on which torch's clip_grad_norm_ fails
  with "All operands in aten.stack.default must have the same mesh"), and HSDP beside
  FSDP2 + tensor parallel: the norms and parameters of one process on the same data.

The 4 processes are started once for the whole module; tests/_dist_grad_norm_worker.py
says what each rank runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist_grad_norm_worker import ITERS, NORM_TYPES, SCENARIOS, WORLD_SIZE, train
from _dist_harness import FSDP2_MISSING, Runs, runnable

pytestmark = pytest.mark.dist
needs_fsdp2 = pytest.mark.skipif(FSDP2_MISSING is not None, reason=str(FSDP2_MISSING))

close = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs.start(
        tmp_path_factory.mktemp("grad_norm"), "_dist_grad_norm_worker", runnable(SCENARIOS), WORLD_SIZE
    )


# -- every placement ---------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_over_every_placement_are_the_full_tensors_norms_on_every_rank(
    runs: Runs, p: float, foreach: bool | None
) -> None:
    results = runs("layouts")
    want_total, want_groups = results[0][p, "reference"]
    for result in results:
        total, per_group, _ = result[p, foreach]
        assert type(total) is torch.Tensor and type(per_group) is torch.Tensor
        assert total.shape == () and per_group.shape == (5,)
        torch.testing.assert_close(total.double(), want_total, **close)
        torch.testing.assert_close(per_group.double(), want_groups, **close)
        assert per_group[4] == 0  # the empty group
    for result in results[1:]:  # bit for bit the same numbers everywhere
        assert torch.equal(result[p, foreach][0], results[0][p, foreach][0])
        assert torch.equal(result[p, foreach][1], results[0][p, foreach][1])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_over_every_placement_take_one_all_reduce_per_set_of_ranks(runs: Runs, p: float) -> None:
    # the meshes of all 4 ranks and the plain tensor: one; the 2-rank sub-mesh: one more
    # (the Partial gradient's own reduction goes through DTensor's functional collectives)
    for result in runs("layouts"):
        assert result[p, None][2] == 2


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_over_every_placement_make_no_host_sync(runs: Runs, p: float) -> None:
    for result in runs("layouts"):
        assert result[p, "syncs"] == []


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_bad_copy_on_one_replica_is_seen_by_every_rank(runs: Runs, value: float) -> None:
    for result in runs("layouts"):
        total, per_group = result["bad", str(value)]
        if math.isnan(value):
            assert total.isnan() and per_group[1].isnan()
        else:
            assert total == math.inf and per_group[1] == math.inf
        assert torch.isfinite(per_group[[0, 2, 3, 4]]).all()  # the other groups are fine


# -- training with clipping ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp2_moe", "hsdp_tp"])
@needs_fsdp2
def test_training_with_clipping_equals_one_process_on_the_same_data(runs: Runs, name: str) -> None:
    want = train(name.removeprefix("fsdp2_"), distributed=False)
    assert max(float(n) for n in want["norms"]) > 0.3  # the clip changed the gradients
    results = runs(name)
    for result in results:
        assert result["norm_types"] == ["Tensor"] * ITERS  # plain tensors, not DTensors
        torch.testing.assert_close(result["norms"], want["norms"], **close)
        torch.testing.assert_close(result["params"], want["params"], **close)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result["norms"], results[0]["norms"]))


@pytest.mark.parametrize("name", ["fsdp2_moe", "hsdp_tp"])
@needs_fsdp2
def test_training_per_group_norms_equal_one_process(runs: Runs, name: str) -> None:
    want = train(name.removeprefix("fsdp2_"), distributed=False)["group_norms"]
    for result in runs(name):
        for got_step, want_step in zip(result["group_norms"], want):
            for p in NORM_TYPES:
                torch.testing.assert_close(got_step[p][0], want_step[p][0], **close)
                torch.testing.assert_close(got_step[p][1], want_step[p][1], **close)


@pytest.mark.parametrize("name", ["fsdp2_moe", "hsdp_tp"])
@needs_fsdp2
def test_the_wrappers_group_norms_and_flags_equal_one_process_on_every_rank(runs: Runs, name: str) -> None:
    """wrapper.last_grad_norms (and nonfinite_groups, all False here) over mixed meshes:
    the global per-group norms, the same tensor on every rank, at no extra all-reduce."""
    want = train(name.removeprefix("fsdp2_"), distributed=False)
    assert all(w.shape == (4,) for w in want["wrapper_groups"])  # two groups, two flags
    results = runs(name)
    for result in results:
        torch.testing.assert_close(result["wrapper_groups"], want["wrapper_groups"], **close)
        assert all(float(w[2:].sum()) == 0 for w in result["wrapper_groups"])
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result["wrapper_groups"], results[0]["wrapper_groups"]))


@pytest.mark.parametrize("name", ["fsdp2_moe", "hsdp_tp"])
@needs_fsdp2
def test_per_group_clipping_over_several_meshes_equals_one_process(runs: Runs, name: str) -> None:
    base = name.removeprefix("fsdp2_")
    want = train(base, distributed=False, per_group=True)
    assert not all(torch.equal(a, b) for a, b in zip(want["params"], train(base, distributed=False)["params"]))
    for result in runs(f"{name}_per_group"):
        torch.testing.assert_close(result["wrapper_groups"], want["wrapper_groups"], **close)
        torch.testing.assert_close(result["params"], want["params"], **close)
        assert result["all_reduces"] == [1] * ITERS and result["syncs"] == []


@pytest.mark.parametrize("name", ["fsdp2_moe", "hsdp_tp"])
@needs_fsdp2
def test_clipping_over_several_meshes_takes_one_all_reduce_per_update_and_no_host_sync(
    runs: Runs, name: str
) -> None:
    for result in runs(name):
        assert result["all_reduces"] == [1] * ITERS
        assert result["syncs"] == []
