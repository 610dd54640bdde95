"""Sharded checkpoints (``save_sharded`` / ``load_sharded``, torch.distributed.checkpoint)
on 2 and 4 gloo ranks: FSDP2 and HSDP, fp32 and fp16 with the sharded scaler, num_items,
async saving, resharding 2 -> 4 and 4 -> 2, and damaged or foreign checkpoints.

What is exact (docs/checkpoints.md, "Sharded checkpoints with DCP"): a run resumed from a
mid-window checkpoint continues bit-identically to the run that took the checkpoint (which
reduce-scattered the window's gradients at that point too); a run that took no checkpoint
differs from both by rounding only.

The ranks are started three times for the module, all scenarios of a world size at once:
2 ranks, then 4 (loading what the 2 saved), then 2 again (loading what the 4 saved).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from _dist_ckpt_worker import ACC, N_ITERS, RESHARD_AT, SAVE_AT, SCENARIOS_2, SCENARIOS_2_AFTER, SCENARIOS_4
from _dist_harness import FSDP2_MISSING, Runs, launch, runnable
from _dist_worker import make_model

from hwoptim import OptimWrapper

pytestmark = [pytest.mark.dist, pytest.mark.skipif(FSDP2_MISSING is not None, reason=str(FSDP2_MISSING))]

MID_WINDOW = ["fsdp2_fp32", "fsdp2_fp16", "fsdp2_items", "fsdp2_async", "hsdp_fp32", "hsdp_fp16", "fsdp2_items_4"]
WORLD = {name: 2 for name in SCENARIOS_2} | {name: 4 for name in SCENARIOS_4} | {n: 2 for n in SCENARIOS_2_AFTER}


class AllRuns:
    """The three launches' results, read by scenario name."""

    def __init__(self, folder: Path) -> None:
        self.failure: str | None = None
        for world, scenarios in ((2, SCENARIOS_2), (4, SCENARIOS_4), (2, SCENARIOS_2_AFTER)):
            try:
                launch(folder, "_dist_ckpt_worker", runnable(list(scenarios)), world)
            except Exception as exc:
                self.failure = f"the {world}-rank launch failed: {type(exc).__name__}: {exc}"
                break
        self.folder = folder

    def __call__(self, scenario: str) -> list[dict]:
        return Runs(self.folder, WORLD[scenario], self.failure)(scenario)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> AllRuns:
    return AllRuns(tmp_path_factory.mktemp("dcp"))


def assert_equal(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g - w).abs().max()


def trained(params: Sequence[torch.Tensor]) -> bool:
    return not all(torch.equal(p, q) for p, q in zip(params, make_model().parameters()))


# -- mid-window checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("scenario", MID_WINDOW)
def test_a_mid_window_resume_continues_bit_identically_to_the_run_that_checkpointed(
    runs: AllRuns, scenario: str
) -> None:
    for result in runs(scenario):
        saver, resumed = result["saver"], result["resumed"]
        assert trained(saver["params"])
        assert_equal(resumed["params"], saver["params"])
        assert (resumed["inner"], resumed["scale"], resumed["skipped"]) == (
            saver["inner"], saver["scale"], saver["skipped"]
        ) == (N_ITERS, saver["scale"], saver["skipped"])


@pytest.mark.parametrize("scenario", MID_WINDOW)
def test_a_mid_window_checkpoint_differs_from_no_checkpoint_by_rounding_only(runs: AllRuns, scenario: str) -> None:
    for result in runs(scenario):
        for got, want in zip(result["saver"]["params"], result["plain"]["params"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scenario", MID_WINDOW)
def test_resuming_a_window_with_its_gradients_does_not_warn(runs: AllRuns, scenario: str) -> None:
    for result in runs(scenario):
        assert result["warnings"] == []


@pytest.mark.parametrize("scenario", ["fsdp2_fp16", "hsdp_fp16"])
def test_the_sharded_scaler_resumes_with_its_scale_and_skip_count(runs: AllRuns, scenario: str) -> None:
    # the first scale, 2**19, overflows at the updates after micro-batches 3 and 6 (the
    # checkpoint falls between them); 2**17 does not
    for result in runs(scenario):
        for run in ("saver", "resumed", "plain"):
            assert (result[run]["scale"], result[run]["skipped"]) == (2.0**17, 2.0)


# -- resharding ------------------------------------------------------------------------------


RESHARD = {"2to4": ("fsdp2_reshard_load_2to4", "fsdp2_reshard_save_2", "fsdp2_reshard_ref_2"),
           "4to2": ("fsdp2_reshard_load_4to2", "fsdp2_reshard_save_4", "fsdp2_reshard_ref_4")}


@pytest.mark.parametrize("direction", list(RESHARD))
def test_a_window_end_checkpoint_loads_on_another_number_of_ranks(runs: AllRuns, direction: str) -> None:
    load, save, ref = RESHARD[direction]
    saved, reference = runs(save)[0], runs(ref)[0]
    for result in runs(load):
        assert result["inner"] == RESHARD_AT
        assert_equal(result["loaded"], saved["at_save"])
        assert_equal(result["exp_avg"], reference["exp_avg"])


@pytest.mark.parametrize("direction", list(RESHARD))
def test_training_continues_after_resharding_as_on_the_saving_ranks(runs: AllRuns, direction: str) -> None:
    load, save, _ = RESHARD[direction]
    saved = runs(save)[0]
    assert trained(saved["after"]) and not all(
        torch.equal(a, b) for a, b in zip(saved["after"], saved["at_save"])
    )
    for result in runs(load):
        for got, want in zip(result["after"], saved["after"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", list(RESHARD))
def test_a_mid_window_checkpoint_on_another_number_of_ranks_is_refused(runs: AllRuns, direction: str) -> None:
    saved_on, loaded_on = (2, 4) if direction == "2to4" else (4, 2)
    for result in runs(RESHARD[direction][0]):
        assert re.match(
            rf"ValueError: .* inside an accumulation window on {saved_on} rank\(s\); this run has {loaded_on}",
            result["mid_error"],
        )


# -- bad checkpoints -------------------------------------------------------------------------


BAD = {
    "corrupted": r"ValueError: .* is damaged: __1_0\.distcp has CRC-32 .* \(corrupted\); nothing was loaded",
    "truncated": r"ValueError: .* is damaged: __0_0\.distcp has \d+ bytes, \d+ were written \(truncated\?\)",
    "foreign": r"ValueError: .* holds no hwoptim state",
    "no_checkpoint": r"FileNotFoundError: .* is not a sharded checkpoint",
    "other_acc": rf"ValueError: .* accumulative_counts={ACC} \(after micro-batch {SAVE_AT}\); this wrapper uses 2",
    "other_model": r"ValueError: .* lacks 8 entr\(ies\) of this model and optimizer \(model\.4\.weight, model\.4\.bias",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_checkpoint_is_refused_with_a_clear_error(runs: AllRuns, kind: str) -> None:
    for result in runs("fsdp2_bad"):
        assert re.match(BAD[kind], result["errors"][kind]), result["errors"][kind]


def test_a_refused_checkpoint_changes_nothing(runs: AllRuns) -> None:
    for result in runs("fsdp2_bad"):
        assert result["unchanged"]
        assert (result["inner"], result["optimizer_state"]) == (0, 0)  # no state made
        assert all(result["grads"])  # no gradient appeared


# -- one process, no torch.distributed -------------------------------------------------------


def test_a_plain_model_round_trips_in_one_process_mid_window(tmp_path: Path) -> None:
    def run(path: Path | None, resume: bool) -> list[torch.Tensor]:
        model = make_model()
        wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=0.01), 3, save_partial_grads=True)
        start = SAVE_AT if resume else 0
        if resume:
            wrapper.load_sharded(tmp_path / "ckpt", model)
        wrapper.initialize_count_status(model, start, N_ITERS)
        for i in range(start, N_ITERS):
            if i == SAVE_AT and path is not None:
                wrapper.save_sharded(path, model)
            g = torch.Generator().manual_seed(i)
            with wrapper.optim_context(model):
                loss = model(torch.randn(4, 4, generator=g)).square().mean()
            wrapper.update_params(loss)
        return [p.detach().clone() for p in model.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        saver = run(tmp_path / "ckpt", resume=False)
        assert_equal(run(None, resume=True), saver)
