"""hwoptim.mmengine: hwoptim's wrappers inside mmengine's real Runner and FlexibleRunner.

Every run here is a real mmengine Runner on a tiny model (tests/_mmengine_worker.py), built
from the one config line a user changes, and compared with what mmengine's own wrapper
does for the same config, or with an uninterrupted run. Nothing of mmengine is patched.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import mmengine.optim as mm_optim
import pytest
import torch
from _dist_harness import Runs
from _mmengine_worker import (
    DIST_ITERS,
    DIST_SYNCED,
    GAN,
    ITERS,
    WORLD_SIZE,
    Data,
    ItemData,
    ItemNet,
    Net,
    StopAfter,
    dataloader,
    dist_optim_wrapper,
    item_weighted_reference,
    params_of,
    runner_kwargs,
)
from helpers import COPIES, assert_same, copied
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import Runner
from test_host_sync import HostSyncDetector

import hwoptim
import hwoptim.mmengine as bridge
from hwoptim import _mmengine_log


def train(work_dir: Path, **overrides: Any) -> Runner:
    runner = Runner(**runner_kwargs(work_dir, **overrides))
    runner.train()
    return runner


def fp32_config(wrapper_type: Any, **extra: Any) -> dict[str, Any]:
    """An fp32 config both libraries take: accumulation with a remainder, clipping."""
    return dict(
        type=wrapper_type,
        optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
        accumulative_counts=3,  # ITERS = 10 iterations: windows 3, 3, 3 and a last one of 1
        clip_grad=dict(max_norm=0.5),
        **extra,
    )


def grad_norms(runner: Runner, key: str = "train/grad_norm") -> list[float]:
    return runner.message_hub.get_scalar(key).data[0].tolist()


# -- the bridge itself --------------------------------------------------------------------


def test_import_hwoptim_does_not_import_mmengine():
    code = "import sys, hwoptim; assert 'mmengine' not in sys.modules, 'imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_wrapper_built_before_mmengine_is_imported_still_joins_it():
    """The class-itself form: no custom_imports, the wrapper's constructor joins mmengine."""
    code = (
        "import sys, torch, hwoptim\n"
        "w = hwoptim.OptimWrapper(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))\n"
        "assert 'hwoptim.mmengine' not in sys.modules\n"
        "assert not w.optimizer._optimizer_step_post_hooks  # nothing added to a plain loop\n"
        "import mmengine.optim\n"
        "w = hwoptim.AmpOptimWrapper(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), device='cpu')\n"
        "assert 'hwoptim.mmengine' in sys.modules\n"
        "assert isinstance(w, mmengine.optim.OptimWrapper) and isinstance(w, mmengine.optim.BaseOptimWrapper)\n"
        "assert len(w.optimizer._optimizer_step_post_hooks) == 1  # the MessageHub logging\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_wrapper_that_cannot_join_mmengine_warns_and_still_trains(monkeypatch):
    monkeypatch.setitem(sys.modules, "hwoptim.mmengine", None)  # as if its import failed
    model = torch.nn.Linear(2, 1)
    with pytest.warns(UserWarning, match=r"cannot join its Runner.*hwoptim\[mmengine\]"):
        wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert not torch.equal(before, model.weight)


def test_the_wrappers_pass_mmengines_isinstance_checks():
    model = torch.nn.Linear(2, 2)
    plain = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    amp = hwoptim.AmpOptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    both = hwoptim.OptimWrapperDict(a=plain, b=amp)
    for wrapper in (plain, amp, both):
        assert isinstance(wrapper, mm_optim.OptimWrapper)
        assert isinstance(wrapper, mm_optim.BaseOptimWrapper)
    # the Runner tells a dict from a single wrapper by these two
    assert isinstance(both, mm_optim.OptimWrapperDict)
    assert not isinstance(plain, mm_optim.OptimWrapperDict)
    assert not isinstance(amp, mm_optim.OptimWrapperDict)
    # nothing of mmengine became hwoptim's
    assert not isinstance(mm_optim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)), hwoptim.OptimWrapper)


def test_the_bridge_can_be_imported_again():
    import importlib

    from mmengine.registry import OPTIM_WRAPPERS

    importlib.reload(bridge)  # e.g. a second custom_imports of a reloaded package
    assert OPTIM_WRAPPERS.get("hwoptim.AmpOptimWrapper") is hwoptim.AmpOptimWrapper


def test_mmengines_schedulers_take_the_wrapper():
    model = torch.nn.Linear(2, 2)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    plateau = mm_optim.ReduceOnPlateauLR(wrapper, monitor="loss", min_value=[0.01], patience=0, factor=0.5)
    linear = mm_optim.LinearLR(wrapper, start_factor=0.5, by_epoch=False, begin=0, end=3)
    assert wrapper.get_lr() == {"lr": [0.05]}
    model(torch.ones(1, 2)).sum().backward()
    wrapper.step()
    linear.step()
    assert wrapper.get_lr()["lr"] == pytest.approx([0.075])
    plateau.step(metrics={"loss": 1.0})
    plateau.step(metrics={"loss": 2.0})  # no better: the lr halves
    assert wrapper.get_lr()["lr"] == pytest.approx([0.0375])


def test_the_scoped_names_are_registered():
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS

    assert OPTIM_WRAPPERS.get("hwoptim.OptimWrapper") is hwoptim.OptimWrapper
    assert OPTIM_WRAPPERS.get("hwoptim.AmpOptimWrapper") is hwoptim.AmpOptimWrapper
    assert OPTIM_WRAPPERS.get("hwoptim.OptimWrapperDict") is hwoptim.OptimWrapperDict
    assert OPTIM_WRAPPER_CONSTRUCTORS.get("hwoptim.OptimWrapperConstructor") is bridge.OptimWrapperConstructor
    # mmengine's own names still mean mmengine's classes
    assert OPTIM_WRAPPERS.get("OptimWrapper") is mm_optim.OptimWrapper


# -- parity with mmengine's own OptimWrapper ------------------------------------------------


SCHEDULES = {
    "by-iteration": dict(
        train_cfg=dict(by_epoch=False, max_iters=ITERS),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.2, by_epoch=False, begin=0, end=4),
            dict(type="MultiStepLR", milestones=[6, 8], gamma=0.5, by_epoch=False),
        ],
    ),
    "by-epoch": dict(
        train_dataloader=dataloader(samples=20),  # 5 iterations an epoch, 2 epochs
        train_cfg=dict(by_epoch=True, max_epochs=2),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.2, by_epoch=False, begin=0, end=3),
            dict(type="MultiStepLR", milestones=[1], gamma=0.5, by_epoch=True),
        ],
    ),
}


@pytest.fixture(scope="module")
def mmengine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Runner]:
    """mmengine's own OptimWrapper on each schedule, run once for the tests that compare."""
    return {
        name: train(tmp_path_factory.mktemp(f"mm-{name}"), optim_wrapper=fp32_config("OptimWrapper"), **run)
        for name, run in SCHEDULES.items()
    }


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("form", ["class", "scoped name"])
def test_fp32_training_matches_mmengines_optim_wrapper(tmp_path, mmengine_runs, schedule, form):
    wrapper_type = hwoptim.OptimWrapper if form == "class" else "hwoptim.OptimWrapper"
    theirs = mmengine_runs[schedule]
    ours = train(tmp_path, optim_wrapper=fp32_config(wrapper_type), **SCHEDULES[schedule])

    assert type(ours.optim_wrapper) is hwoptim.OptimWrapper
    assert type(theirs.optim_wrapper) is mm_optim.OptimWrapper
    assert ours.optim_wrapper.inner_count == theirs.optim_wrapper.inner_count == ITERS
    # the last, one-micro-batch window stepped: 4 updates, each logged once
    assert len(grad_norms(ours)) == len(grad_norms(theirs)) == 4
    assert grad_norms(ours) == grad_norms(theirs)
    assert ours.optim_wrapper.get_lr() == theirs.optim_wrapper.get_lr()
    assert_same(params_of(ours.model), params_of(theirs.model))  # bit for bit
    # the schedule did something: the lr at the end is not the initial one
    assert ours.optim_wrapper.get_lr()["lr"][0] != 0.1


# -- AMP where mmengine refuses ------------------------------------------------------------


def test_mmengines_amp_wrapper_refuses_the_cpu(tmp_path):
    with pytest.raises(AssertionError, match="only available training on gpu"):
        train(tmp_path, optim_wrapper=dict(type="AmpOptimWrapper", dtype="bfloat16",
                                           optimizer=dict(type="SGD", lr=0.1)))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_trains_on_the_cpu_and_logs_its_values(tmp_path, dtype):
    runner = train(tmp_path, optim_wrapper=dict(
        type="hwoptim.AmpOptimWrapper", device="cpu", dtype=dtype, accumulative_counts=2,
        optimizer=dict(type="AdamW", lr=0.01), clip_grad=dict(max_norm=1.0),
    ))
    wrapper = runner.optim_wrapper
    assert wrapper.cast_dtype == getattr(torch, dtype)
    assert set(runner.model.forward_dtypes) == {getattr(torch, dtype)}  # autocast in the forward
    before = Net().state_dict()
    assert any(not torch.equal(before[k], v) for k, v in runner.model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())
    scalars = runner.message_hub.log_scalars
    assert len(scalars["train/grad_norm"].data[0]) > 0
    if dtype == "float16":
        scales = scalars["train/loss_scale"].data[0]
        assert scales[-1] == float(wrapper.loss_scale)
    else:  # bf16 scales nothing, so there is no loss scale to log
        assert wrapper.loss_scaler is None and "train/loss_scale" not in scalars


def plugin_backend(name: str) -> Any:
    """A parameter for the backend a plugin under backends/ adds: skipped, saying how to
    install it, where that plugin is not installed (the README's `pip install -e ".[test]"`
    installs none)."""
    package = f"hwoptim-{name}"
    missing = importlib.util.find_spec(package.replace("-", "_")) is None
    reason = f"the {package} plugin is not installed: pip install -e backends/{package}"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason))


@pytest.mark.parametrize("backend", ["cuda", "npu", "xpu", "mps", plugin_backend("hpu"), plugin_backend("mlu")])
def test_amp_under_the_runner_on_a_mocked_backend(tmp_path, backend):
    from hwoptim.testing import mock_backend

    # a fixed loss scale works on any dtype, bf16-only Gaudi included
    dtype = "bfloat16" if backend == "hpu" else "float16"
    with mock_backend(backend) as mock:
        runner = train(tmp_path, optim_wrapper=dict(
            type=hwoptim.AmpOptimWrapper, dtype=dtype, optimizer=dict(type="SGD", lr=0.1),
            clip_grad=dict(max_norm=1.0), loss_scale=256.0,
        ))
        assert runner.optim_wrapper.backend.name == backend  # device="auto" picked it
        calls = mock.call_names()
    assert runner.optim_wrapper.inner_count == ITERS
    assert runner.optim_wrapper.cast_dtype == getattr(torch, dtype)
    assert runner.message_hub.get_scalar("train/loss_scale").current() == 256.0
    assert len(runner.message_hub.get_scalar("train/grad_norm").data[0]) == ITERS
    if backend == "npu":  # the vendor's own scaler did the scaling
        assert "torch_npu.npu.amp.GradScaler.step" in calls


# -- logging: the values reach the MessageHub, read only at the logging interval -------------


class SyncsPerIteration(Hook):
    """Counts hwoptim's host syncs per iteration (runs after the LoggerHook's read)."""

    priority = "LOWEST"

    def __init__(self, detector: HostSyncDetector) -> None:
        self.detector = detector
        self.per_iter: list[int] = []

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._before = len(self.detector.by("hwoptim"))

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        self.per_iter.append(len(self.detector.by("hwoptim")) - self._before)


def test_grad_norm_and_loss_scale_are_read_only_at_the_logging_interval(tmp_path):
    interval = 4
    detector = HostSyncDetector()
    counter = SyncsPerIteration(detector)
    runner = Runner(**runner_kwargs(
        tmp_path,
        train_dataloader=dataloader(samples=48),  # one epoch of 12 iterations
        train_cfg=dict(by_epoch=False, max_iters=12),
        optim_wrapper=dict(type=hwoptim.AmpOptimWrapper, device="cpu", dtype="float16",
                           optimizer=dict(type="AdamW", lr=0.01, fused=True),
                           clip_grad=dict(max_norm=1.0), accumulative_counts=2),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=interval), checkpoint=None),
        custom_hooks=[counter],
    ))
    with detector:
        runner.train()

    logged = [(i + 1) % interval == 0 for i in range(12)]
    assert [n > 0 for n in counter.per_iter] == logged, counter.per_iter
    # at a logging iteration: one transfer per key, however many updates were queued
    assert all(n <= 2 for n in counter.per_iter)
    assert {c.method for c in detector.by("hwoptim")} == {"tolist"}
    scalars = runner.message_hub.log_scalars
    assert len(scalars["train/grad_norm"].data[0]) == 6  # one value per update
    assert len(scalars["train/loss_scale"].data[0]) == 6


class RecordGroupNorms(Hook):
    """Records the wrapper's per-group norms (as Python numbers) after every update."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        wrapper = runner.optim_wrapper
        if wrapper.should_update():
            self.norms.append({k: v.item() for k, v in wrapper.last_grad_norms.items()})


def test_per_group_norms_reach_the_logs_as_grad_norm_slash_group_read_at_the_interval(tmp_path):
    """paramwise_cfg's custom_keys name the groups (one per parameter, merged by name);
    each group's norm is queued on the device per update and read only when logged."""
    interval = 4
    detector = HostSyncDetector()
    counter = SyncsPerIteration(detector)
    recorder = RecordGroupNorms()
    runner = Runner(**runner_kwargs(
        tmp_path,
        train_dataloader=dataloader(samples=48),
        train_cfg=dict(by_epoch=False, max_iters=12),
        optim_wrapper=dict(
            type="hwoptim.OptimWrapper", constructor="hwoptim.OptimWrapperConstructor",
            optimizer=dict(type="SGD", lr=0.1), clip_grad=dict(max_norm=1.0),
            accumulative_counts=2,
            paramwise_cfg=dict(custom_keys={"fc1": dict(name="fc1"), "fc2": dict(name="fc2")}),
        ),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=interval), checkpoint=None),
        custom_hooks=[counter, recorder],
        log_level="INFO",
    ))
    with detector:
        runner.train()
    wrapper = runner.optim_wrapper
    assert len(wrapper.param_groups) == 4  # one per parameter, two names
    scalars = runner.message_hub.log_scalars
    assert {"train/grad_norm/fc1", "train/grad_norm/fc2"} <= set(scalars)
    for group in ("fc1", "fc2"):
        logged = scalars[f"train/grad_norm/{group}"].data[0].tolist()
        assert logged == pytest.approx([n[group] for n in recorder.norms], rel=1e-6)
        assert len(logged) == 6  # one per update
    logged_iters = [(i + 1) % interval == 0 for i in range(12)]
    assert [n > 0 for n in counter.per_iter] == logged_iters, counter.per_iter
    assert {c.method for c in detector.by("hwoptim")} == {"tolist"}
    log = next(Path(runner.log_dir).glob("*.log")).read_text()
    assert "grad_norm/fc1: " in log and "grad_norm/fc2: " in log


def test_one_param_group_logs_no_per_group_norm_and_many_only_the_named(tmp_path):
    runner = train(tmp_path, optim_wrapper=fp32_config("hwoptim.OptimWrapper"))
    assert not any(k.startswith("train/grad_norm/") for k in runner.message_hub.log_scalars)
    hook = _mmengine_log._LogAfterStep(runner.optim_wrapper)
    many = (*range(bridge.MAX_LOGGED_GROUPS), "head")
    assert hook.group_keys(many) == {"head": "train/grad_norm/head"}
    assert hook.group_keys((0, "head")) == {0: "train/grad_norm/0", "head": "train/grad_norm/head"}
    hook.name("gen")
    assert hook.group_keys((0, 1)) == {0: "train/gen.grad_norm/0", 1: "train/gen.grad_norm/1"}


def test_the_log_shows_grad_norm_and_loss_scale(tmp_path):
    runner = train(
        tmp_path,
        optim_wrapper=dict(type="hwoptim.AmpOptimWrapper", device="cpu", dtype="float16",
                           optimizer=dict(type="SGD", lr=0.1), clip_grad=dict(max_norm=1.0)),
        default_hooks=dict(logger=dict(type="LoggerHook", interval=5), checkpoint=None),
        log_level="INFO",
    )
    log = next(Path(runner.log_dir).glob("*.log")).read_text()
    assert "grad_norm: " in log and "loss_scale: " in log


def test_a_device_history_buffer_reads_its_values_in_one_transfer():
    buffer = bridge.DeviceHistoryBuffer([1.0], [1])
    with HostSyncDetector() as detector:
        for value in (2.0, 4.0, 6.0):
            buffer.push(torch.tensor(value))
        assert detector.calls == []  # pushing reads nothing
        assert buffer.pending == 3
        assert buffer.mean(3) == 4.0
    assert [c.method for c in detector.by("hwoptim")] == ["tolist"]
    assert buffer.pending == 0
    assert buffer.current() == 6.0 and buffer.max() == 6.0 and buffer.min() == 1.0
    assert buffer.statistics("mean") == 13.0 / 4


def test_a_device_history_buffer_folds_and_keeps_max_length():
    buffer = bridge.DeviceHistoryBuffer(max_length=300)
    for i in range(700):
        buffer.push(torch.tensor(float(i)))
    assert buffer.pending <= 700
    logs, counts = buffer.data
    assert logs.tolist() == [float(i) for i in range(400, 700)]
    assert counts.tolist() == [1.0] * 300


def test_a_device_history_buffer_pickles_as_a_plain_history_buffer():
    import copy
    import pickle

    buffer = bridge.DeviceHistoryBuffer([1.0], [1])
    buffer.push(torch.tensor(3.0))
    for clone in (copy.deepcopy(buffer), pickle.loads(pickle.dumps(buffer))):
        assert type(clone) is HistoryBuffer
        assert clone.data[0].tolist() == [1.0, 3.0]


def test_a_resumed_plain_buffer_is_continued():
    hub = MessageHub.get_instance(f"resumed-{uuid.uuid4().hex}")
    hub.update_scalar("train/grad_norm", 5.0)  # as MessageHub.load_state_dict leaves it
    model = torch.nn.Linear(2, 1)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0))
    model(torch.ones(1, 2)).sum().backward()
    wrapper.step()
    buffer = hub.get_scalar("train/grad_norm")
    assert type(buffer) is bridge.DeviceHistoryBuffer
    assert buffer.data[0].tolist() == pytest.approx([5.0, float(wrapper.last_grad_norm)])
    assert "train/grad_norm" in hub.state_dict()["log_scalars"]  # saved with checkpoints


@pytest.mark.parametrize("fused", [False, True])
def test_an_update_the_scaler_skips_is_logged_only_when_the_optimizer_ran(fused):
    hub = MessageHub.get_instance(f"skips-{uuid.uuid4().hex}")  # now the current hub
    model = torch.nn.Linear(2, 1)
    wrapper = hwoptim.AmpOptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused), device="cpu", dtype="float16",
        loss_scale=dict(init_scale=2.0**40), clip_grad=dict(max_norm=1.0),  # overflows in fp16
    )
    with wrapper.optim_context(model):
        loss = model(torch.ones(1, 2)).float().sum()
    wrapper.update_params(loss)
    assert float(wrapper.skipped_steps) == 1
    norms = hub.get_scalar("train/grad_norm").data[0].tolist() if "train/grad_norm" in hub.log_scalars else []
    # fused: the optimizer ran and skipped on the device, and its inf norm is logged
    assert norms == ([float("inf")] if fused else [])


def test_a_wrapper_can_leave_the_message_hub():
    hub = MessageHub.get_instance(f"leave-{uuid.uuid4().hex}")
    model = torch.nn.Linear(2, 1)
    wrapper = hwoptim.OptimWrapperDict(a=hwoptim.OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0)))
    for _ in range(2):
        model(torch.ones(1, 2)).sum().backward()
        wrapper["a"].step()
        if "train/a.grad_norm" in hub.log_scalars:
            bridge.leave(wrapper)
    assert len(hub.get_scalar("train/a.grad_norm").data[0]) == 1  # the second update: not logged
    assert not wrapper["a"].optimizer._optimizer_step_post_hooks
    assert isinstance(wrapper, mm_optim.OptimWrapperDict)
    bridge.leave(wrapper)  # again: nothing to do


# -- checkpoints ----------------------------------------------------------------------------


RESUME_CONFIG = dict(
    type=hwoptim.AmpOptimWrapper, device="cpu", dtype="float16", accumulative_counts=3,
    optimizer=dict(type="AdamW", lr=0.01), clip_grad=dict(max_norm=1.0),
)
RESUME_RUN = dict(
    train_cfg=dict(by_epoch=False, max_iters=ITERS),
    param_scheduler=dict(type="LinearLR", start_factor=0.2, by_epoch=False, begin=0, end=8),
)


def _checkpointed(tmp_path: Path, name: str, optim_wrapper: dict[str, Any], stop_at: int) -> Path:
    """Train ``stop_at`` iterations with a checkpoint every 3; return the work dir."""
    work_dir = tmp_path / name
    with pytest.raises(KeyboardInterrupt):
        train(work_dir, optim_wrapper=optim_wrapper, custom_hooks=[StopAfter(stop_at)],
              default_hooks=dict(logger=None, checkpoint=dict(type="CheckpointHook", interval=3,
                                                              by_epoch=False)),
              **RESUME_RUN)
    return work_dir


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    straight = train(tmp_path / "straight", optim_wrapper=RESUME_CONFIG, **RESUME_RUN)
    work_dir = _checkpointed(tmp_path, "interrupted", RESUME_CONFIG, stop_at=7)
    assert (work_dir / "iter_6.pth").exists()  # the last window boundary before the stop

    resumed = train(work_dir, optim_wrapper=RESUME_CONFIG, resume=True, **RESUME_RUN)

    assert resumed.iter == straight.iter == ITERS
    assert_same(params_of(resumed.model), params_of(straight.model))
    assert_same(resumed.optim_wrapper.state_dict(), straight.optim_wrapper.state_dict())
    assert float(resumed.optim_wrapper.loss_scale) == float(straight.optim_wrapper.loss_scale)
    # the log history came back with the checkpoint and went on
    assert grad_norms(resumed) == grad_norms(straight)


def test_a_checkpoint_of_mmengines_wrapper_resumes_in_hwoptim(tmp_path):
    theirs = fp32_config("OptimWrapper")
    straight = train(tmp_path / "straight", optim_wrapper=theirs, **RESUME_RUN)
    work_dir = _checkpointed(tmp_path, "interrupted", theirs, stop_at=6)
    with bridge.safe_loading():
        checkpoint = torch.load(work_dir / "iter_6.pth", weights_only=True)
    assert "hwoptim" not in checkpoint["optimizer"]  # written by mmengine's wrapper

    resumed = train(work_dir, optim_wrapper=fp32_config(hwoptim.OptimWrapper), resume=True, **RESUME_RUN)

    assert type(resumed.optim_wrapper) is hwoptim.OptimWrapper
    # the Runner's initialize_count_status put the counters where mmengine's would be
    assert resumed.optim_wrapper.inner_count == ITERS
    assert_same(params_of(resumed.model), params_of(straight.model))


# -- several optimizers --------------------------------------------------------------------


GAN_CONFIG = dict(
    constructor="hwoptim.OptimWrapperConstructor",
    generator=dict(type="hwoptim.AmpOptimWrapper", device="cpu", dtype="bfloat16",
                   optimizer=dict(type="Adam", lr=1e-3), clip_grad=dict(max_norm=1.0)),
    discriminator=dict(optimizer=dict(type="SGD", lr=0.01), accumulative_counts=3,
                       clip_grad=dict(max_norm=1.0)),
)


def test_an_optim_wrapper_dict_trains_a_gan_under_the_runner(tmp_path):
    runner = train(
        tmp_path, model=GAN(), optim_wrapper=GAN_CONFIG,
        param_scheduler=dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=4),
        default_hooks=dict(logger=None, checkpoint=dict(type="CheckpointHook", interval=ITERS,
                                                        by_epoch=False)),
    )
    wrappers = runner.optim_wrapper
    assert type(wrappers) is hwoptim.OptimWrapperDict
    assert set(runner.param_schedulers) == {"generator", "discriminator"}
    # the Runner's initialize_count_status reached both (mmengine's dict ignores it)
    assert wrappers.inner_count == {"generator": ITERS, "discriminator": ITERS}
    assert wrappers["discriminator"]._window.max_counts == ITERS
    scalars = runner.message_hub.log_scalars
    assert len(scalars["train/generator.grad_norm"].data[0]) == ITERS
    assert len(scalars["train/discriminator.grad_norm"].data[0]) == 4  # 3+3+3+1
    assert "train/generator.lr" in scalars and "train/discriminator.lr" in scalars
    assert (tmp_path / f"iter_{ITERS}.pth").exists()

    # The same train_step in a plain loop over the same batches, without the Runner.
    model = GAN()
    reference = hwoptim.build_optim_wrapper(model, dict(
        generator=dict(GAN_CONFIG["generator"], type="AmpOptimWrapper"),
        discriminator=GAN_CONFIG["discriminator"],
    ))
    reference.initialize_count_status(model, 0, ITERS)
    schedulers = [mm_optim.LinearLR(w, start_factor=0.5, by_epoch=False, begin=0, end=4)
                  for w in reference.values()]
    loader = torch.utils.data.DataLoader(Data(), batch_size=4, shuffle=False)
    for batch in loader:
        model.train_step(batch, reference)
        for scheduler in schedulers:
            scheduler.step()
    assert_same(params_of(model), params_of(runner.model))


def test_an_optim_wrapper_dict_by_its_scoped_name():
    from mmengine.optim import build_optim_wrapper as mm_build_optim_wrapper
    from mmengine.registry import OPTIM_WRAPPERS

    model = GAN()
    built = mm_build_optim_wrapper(model, dict(
        constructor="hwoptim.OptimWrapperConstructor", type="hwoptim.OptimWrapperDict",
        generator=dict(optimizer=dict(type="Adam", lr=1e-3)),
        discriminator=dict(type="hwoptim.OptimWrapper", optimizer=dict(type="SGD", lr=0.01)),
    ))
    assert type(built) is hwoptim.OptimWrapperDict and list(built) == ["generator", "discriminator"]
    assert built["generator"].param_groups[0]["params"][0] is model.generator.weight
    # from built wrappers, through mmengine's registry (a constructor of one's own does this)
    again = OPTIM_WRAPPERS.build(dict(type="hwoptim.OptimWrapperDict", **dict(built.items())))
    assert type(again) is hwoptim.OptimWrapperDict and again["generator"] is built["generator"]
    with pytest.raises(ValueError, match="one wrapper config per submodule name"):
        bridge.OptimWrapperConstructor(dict(type="hwoptim.OptimWrapperDict", optimizer=dict(type="SGD")))


def test_the_constructor_builds_what_mmengines_default_constructor_cannot(tmp_path):
    from mmengine.registry import OPTIMIZERS

    class Registered(torch.optim.SGD):
        pass

    name = f"HwoptimTestSGD{uuid.uuid4().hex[:6]}"
    OPTIMIZERS.register_module(name=name, module=Registered)
    runner = train(tmp_path, optim_wrapper=dict(
        constructor="hwoptim.OptimWrapperConstructor", type="hwoptim.AmpOptimWrapper",
        device="cpu", dtype="bfloat16", optimizer=dict(type=name, lr=0.1),
        paramwise_cfg=dict(custom_keys={"fc1": dict(lr_mult=0.5)}),
    ))
    wrapper = runner.optim_wrapper
    assert type(wrapper.optimizer) is Registered  # a name only mmengine's registry knows
    assert [g["lr"] for g in wrapper.param_groups[:2]] == [0.05, 0.05]  # fc1: weight, bias

    with pytest.raises(ValueError, match="does not take 'momentun'"):  # checked on build
        train(tmp_path / "bad", optim_wrapper=dict(
            constructor="hwoptim.OptimWrapperConstructor", type="OptimWrapper",
            optimizer=dict(type="SGD", lr=0.1), momentun=0.9))


def test_a_config_file_with_custom_imports(tmp_path):
    from mmengine.config import Config

    config = tmp_path / "config.py"
    config.write_text(
        'custom_imports = dict(imports=["hwoptim.mmengine", "_mmengine_worker"])\n'
        'model = dict(type="HwoptimTestNet")\n'
        f'work_dir = {str(tmp_path / "work")!r}\n'
        'train_dataloader = dict(dataset=dict(type="HwoptimTestData"), batch_size=4,\n'
        '    sampler=dict(type="DefaultSampler", shuffle=False), collate_fn=dict(type="default_collate"))\n'
        f'train_cfg = dict(by_epoch=False, max_iters={ITERS})\n'
        'optim_wrapper = dict(type="hwoptim.AmpOptimWrapper", dtype="bfloat16", device="cpu",\n'
        '    optimizer=dict(type="SGD", lr=0.1), clip_grad=dict(max_norm=1.0))\n'
        'default_hooks = dict(logger=None, checkpoint=None)\n'
        'log_level = "ERROR"\n'
        f'experiment_name = "cfg-{uuid.uuid4().hex[:8]}"\n'
    )
    runner = Runner.from_cfg(Config.fromfile(str(config)))
    runner.train()
    assert type(runner.optim_wrapper) is hwoptim.AmpOptimWrapper
    assert set(runner.model.forward_dtypes) == {torch.bfloat16}


def test_a_python_config_file_with_the_class_itself(tmp_path):
    """mmengine's pure-Python configs import what they name (lazily): no custom_imports."""
    from mmengine.config import Config

    config = tmp_path / "config.py"
    config.write_text(
        "import hwoptim\n"
        "from _mmengine_worker import Data, Net\n"
        "model = dict(type=Net)\n"
        f"work_dir = {str(tmp_path / 'work')!r}\n"
        "train_dataloader = dict(dataset=dict(type=Data), batch_size=4,\n"
        "    sampler=dict(type='DefaultSampler', shuffle=False), collate_fn=dict(type='default_collate'))\n"
        f"train_cfg = dict(by_epoch=False, max_iters={ITERS})\n"
        "optim_wrapper = dict(type=hwoptim.AmpOptimWrapper, dtype='float16', device='cpu',\n"
        "    optimizer=dict(type='SGD', lr=0.1), clip_grad=dict(max_norm=1.0))\n"
        "default_hooks = dict(logger=None, checkpoint=None)\n"
        "log_level = 'ERROR'\n"
        f"experiment_name = 'cfg-{uuid.uuid4().hex[:8]}'\n"
    )
    runner = Runner.from_cfg(Config.fromfile(str(config)))
    runner.train()
    assert type(runner.optim_wrapper) is hwoptim.AmpOptimWrapper
    assert set(runner.model.forward_dtypes) == {torch.float16}
    assert "train/loss_scale" in runner.message_hub.log_scalars


# -- item-weighted accumulation: num_items from the model's losses ---------------------------


ITEMS_CONFIG = dict(
    type=hwoptim.OptimWrapper, optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
    accumulative_counts=3,  # ITERS = 10: windows of 3, 3, 3 and a remainder of 1
    clip_grad=dict(max_norm=0.5),
)


def test_an_item_weighted_model_matches_the_per_item_mean_of_each_window(tmp_path):
    runner = train(tmp_path, model=ItemNet(), optim_wrapper=ITEMS_CONFIG,
                   train_dataloader=dataloader(dataset=ItemData()))
    params, item_loss, norms = item_weighted_reference(ITERS, 3)
    counts = [int(ItemData().mask[i * 12:(i + 1) * 12].sum()) for i in range(3)]
    assert len(set(counts)) > 1  # the windows really hold different numbers of items

    for got, want in zip(params_of(runner.model), params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    scalars = runner.message_hub.log_scalars
    assert scalars["train/item_loss"].data[0].tolist() == pytest.approx(item_loss, rel=1e-5)
    assert grad_norms(runner) == pytest.approx(norms, rel=1e-5)
    assert max(norms) > 0.5  # the clip acted


def test_item_loss_is_logged_per_member_and_only_with_num_items():
    hub = MessageHub.get_instance(f"items-{uuid.uuid4().hex}")
    model = torch.nn.Linear(2, 1)
    wrappers = hwoptim.OptimWrapperDict(a=hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    wrappers["a"].update_params(model(torch.ones(1, 2)).sum())  # no num_items: nothing to log
    assert not any("item_loss" in key for key in hub.log_scalars)
    with HostSyncDetector() as detector:
        wrappers["a"].update_params(model(torch.ones(3, 2)).sum(), num_items=torch.tensor(3))
    assert detector.by("hwoptim") == []  # queued, not read
    assert hub.get_scalar("train/a.item_loss").data[0].tolist() == [pytest.approx(float(wrappers["a"].last_loss))]


def test_an_item_weighted_model_refuses_what_would_be_silently_wrong():
    model = ItemNet()
    x, y, mask = torch.ones(2, 4), torch.zeros(2, 2), torch.ones(2, 2)
    losses = model(x, y, mask)
    # mmengine's own DDP train_step calls parse_losses with the count still in the dict
    with pytest.raises(ValueError, match="ItemWeightedDistributedDataParallel"):
        model.parse_losses(losses)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="must hold 'num_items'"):
        bridge._update_with_items(model, {"loss": losses["loss"]}, wrapper)
    assert model.parse_losses({"loss": losses["loss"]})[0] is not None  # without it: BaseModel's


# -- distributed: 2 gloo ranks -----------------------------------------------------------


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs.start(tmp_path_factory.mktemp("mmengine-dist"), "_mmengine_worker",
                      ["runner", "flexible", "items", "items-flexible"], WORLD_SIZE)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    """One process on the batches of both ranks together."""
    return train(tmp_path_factory.mktemp("mmengine-single"), optim_wrapper=dist_optim_wrapper(),
                 train_cfg=dict(by_epoch=False, max_iters=DIST_ITERS))


@pytest.mark.dist
@pytest.mark.parametrize("scenario", ["runner", "flexible"])
def test_ddp_all_reduces_only_on_the_micro_batches_that_update(dist_runs, scenario):
    for rank in dist_runs(scenario):
        assert rank["model_type"] == "MMDistributedDataParallel"
        updates = [n > 0 for n in rank["collectives"]]
        assert updates == DIST_SYNCED, rank["collectives"]


@pytest.mark.dist
@pytest.mark.parametrize("scenario", ["runner", "flexible"])
def test_ddp_under_the_runner_matches_one_process(dist_runs, single_process, scenario):
    if scenario == "flexible":
        assert dist_runs(scenario)[0]["optim_wrapper_type"] == "hwoptim.wrapper.OptimWrapper"
    want = params_of(single_process.model)
    for rank in dist_runs(scenario):
        for got, expected in zip(rank["params"], want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if scenario == "runner":
        assert dist_runs(scenario)[0]["grad_norm"] == pytest.approx(grad_norms(single_process), rel=1e-5)


# -- FSDPStrategy: what runs on a CPU --------------------------------------------------------


@pytest.mark.parametrize("use_fsdp", [None, True])
def test_fsdp_strategy_builds_the_wrapper_and_needs_use_fsdp_said(tmp_path, use_fsdp):
    """FSDPStrategy wraps with FSDP1, which torch builds only on an accelerator; its optimizer
    path runs here. It turns on use_fsdp only for mmengine's own AmpOptimWrapper type, so an
    hwoptim config says use_fsdp=True itself (docs/migrating-from-mmengine.md)."""
    from mmengine._strategy import FSDPStrategy
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    strategy = FSDPStrategy(work_dir=str(tmp_path), experiment_name=f"fsdp-{uuid.uuid4().hex[:8]}")
    cfg = dict(type="hwoptim.AmpOptimWrapper", device="cpu", dtype="float16",
               optimizer=dict(type="SGD", lr=0.1))
    if use_fsdp is not None:
        cfg["use_fsdp"] = use_fsdp
    wrapper = strategy.build_optim_wrapper(cfg, model=Net())
    assert type(wrapper) is hwoptim.AmpOptimWrapper
    assert isinstance(wrapper.loss_scaler, ShardedGradScaler) is bool(use_fsdp)


@pytest.mark.dist
@pytest.mark.parametrize("scenario", ["items", "items-flexible"])
def test_item_weighted_ddp_under_the_runner_matches_one_process(dist_runs, scenario):
    """Each rank sees half of each batch; the counts are summed over both at each update,
    so both ranks end where one process on the whole batches does (the plain-torch one)."""
    params, item_loss, _ = item_weighted_reference(DIST_ITERS, 3)
    for rank in dist_runs(scenario):
        assert rank["model_type"] == "ItemWeightedDistributedDataParallel"
        if scenario == "items":
            assert [n > 0 for n in rank["collectives"]] == DIST_SYNCED  # still skipped between
        for got, want in zip(rank["params"], params):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert rank["item_loss"] == pytest.approx(item_loss, rel=1e-5)


@pytest.mark.parametrize("how", COPIES)
def test_a_copied_wrapper_logs_to_the_message_hub_under_its_names(how):
    hub = MessageHub.get_instance(f"copies-{uuid.uuid4().hex}")
    model = torch.nn.Linear(2, 1)
    wrapper = hwoptim.OptimWrapperDict(a=hwoptim.OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0)))
    model2, wrapper2 = copied((model, wrapper), how)
    assert len(wrapper2["a"].optimizer._optimizer_step_post_hooks) == 1  # its own, not copied
    for _ in range(2):
        model2(torch.ones(1, 2)).sum().backward()
        wrapper2["a"].step()
    assert len(hub.get_scalar("train/a.grad_norm").data[0]) == 2
    assert isinstance(wrapper2, mm_optim.OptimWrapperDict)


# -- what mmengine code reads of a wrapper: its log, message_hub, the Runner's dict ----------


def test_hwoptims_warnings_reach_mmengines_current_logger():
    """mmengine's own test_initialize_iter_status: one logger record per warning."""
    import unittest

    from mmengine.logging import MMLogger

    logger = MMLogger.get_instance(f"hwoptim-test-{uuid.uuid4().hex[:8]}")  # now the current one
    model = torch.nn.Linear(2, 2)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    case = unittest.TestCase()
    with case.assertLogs(logger, "WARNING") as logged, pytest.warns(UserWarning, match="Resumed iteration") as warned:
        wrapper.initialize_count_status(model, 2, 100)
    assert [r.getMessage() for r in logged.records] == [f"hwoptim: {warned[0].message}"]
    assert warned[0].filename == __file__  # the Python warning still points at this line
    with case.assertLogs(logger, "WARNING") as logged, pytest.warns(UserWarning, match="BatchNorm"):
        wrapper.initialize_count_status(torch.nn.BatchNorm1d(2), 0, 99)
    assert len(logged.records) == 1 and "Gradient accumulative" in logged.records[0].getMessage()


def test_a_warning_turned_into_an_error_is_not_logged():
    from mmengine.logging import MMLogger

    MMLogger.get_instance(f"hwoptim-test-{uuid.uuid4().hex[:8]}")
    heard: list[str] = []
    hwoptim._warn.subscribe("test", lambda message, category: heard.append(message))
    try:
        wrapper = hwoptim.OptimWrapper(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                                       accumulative_counts=3)
        with pytest.warns(UserWarning, match="Resumed"):
            wrapper.initialize_count_status(None, 1, 10)
        assert len(heard) == 1 and heard[0].startswith("Resumed iteration number 1")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="Resumed"):
                wrapper.initialize_count_status(None, 1, 10)
        assert len(heard) == 1  # raised before the subscribers heard of it
    finally:
        hwoptim._warn.unsubscribe("test")


def test_the_wrappers_have_mmengines_message_hub():
    """mmengine's own test_init: the hub current when the wrapper is made, where it logs."""
    hub = MessageHub.get_instance(f"hwoptim-test-{uuid.uuid4().hex[:8]}")
    model = torch.nn.Linear(2, 2)
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), clip_grad=dict(max_norm=1.0))
    assert wrapper.message_hub is hub
    wrapper.update_params(model(torch.ones(1, 2)).sum())
    assert "train/grad_norm" in hub.log_scalars
    with pytest.raises(AttributeError, match=r"wrappers\[name\].message_hub"):  # as in mmengine: none
        hwoptim.OptimWrapperDict(a=wrapper).message_hub  # noqa: B018


def _gan_wrappers(model: Any) -> dict[str, Any]:
    return dict(
        generator=hwoptim.OptimWrapper(torch.optim.Adam(model.generator.parameters(), lr=1e-3)),
        discriminator=hwoptim.OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.01),
                                           accumulative_counts=3, clip_grad=dict(max_norm=1.0)),
    )


def test_the_runner_warns_in_its_log_when_it_wraps_hwoptims_wrappers_in_mmengines_dict(tmp_path):
    """Given a dict of built wrappers, mmengine's Runner makes its own OptimWrapperDict
    (mmengine's test_build_optim_wrapper): the run says so, in its log file too."""
    model = GAN()
    with pytest.warns(UserWarning, match="mmengine's own OptimWrapperDict") as warned:
        runner = train(tmp_path, model=model, optim_wrapper=_gan_wrappers(model), log_level="WARNING")
    assert type(runner.optim_wrapper) is mm_optim.OptimWrapperDict
    about_the_dict = [str(w.message) for w in warned if "mmengine's own OptimWrapperDict" in str(w.message)]
    assert len(about_the_dict) == 1  # once per dict, though both members step
    assert "optim_wrapper=hwoptim.OptimWrapperDict(generator=..., discriminator=...)" in about_the_dict[0]
    log = next(tmp_path.glob("*/*.log")).read_text()
    assert "hwoptim: mmengine's Runner holds hwoptim's wrappers ['generator', 'discriminator']" in log
    # the windows' end never reached the members: the unknown-end warning, in the log too
    assert "hwoptim: accumulating gradients over 3 micro-batches without initialize_count_status" in log

    # hwoptim's dict, given as it is: the Runner keeps it, and its counts reach the members
    model = GAN()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner = train(tmp_path / "dict", model=model, log_level="WARNING",
                       optim_wrapper=hwoptim.OptimWrapperDict(**_gan_wrappers(model)))
    assert type(runner.optim_wrapper) is hwoptim.OptimWrapperDict
    assert runner.optim_wrapper["discriminator"]._window.max_counts == ITERS
    assert "train/discriminator.grad_norm" in runner.message_hub.log_scalars


def test_the_extras_never_install_a_second_mmengine():
    """Full mmengine and mmengine-lite both install the package "mmengine": an extra naming
    lite adds a second copy to every OpenMMLab project, which has full mmengine."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python >= 3.11")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = {
        extra: {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in reqs}
        for extra, reqs in pyproject["project"]["optional-dependencies"].items()
    }
    for extra in ("mmengine", "test"):
        assert "mmengine" in names[extra], extra
    for extra, reqs in names.items():
        assert "mmengine-lite" not in reqs, extra
        # full mmengine requires opencv-python: a headless one beside it is a second cv2
        assert not ("mmengine" in reqs and "opencv-python-headless" in reqs), extra


def _base_config(tmp_path: Path) -> None:
    (tmp_path / "base.py").write_text(
        'custom_imports = dict(imports=["_mmengine_worker"])\n'
        'model = dict(type="HwoptimTestNet")\n'
        'train_dataloader = dict(dataset=dict(type="HwoptimTestData"), batch_size=4,\n'
        '    sampler=dict(type="DefaultSampler", shuffle=False), collate_fn=dict(type="default_collate"))\n'
        f'train_cfg = dict(by_epoch=False, max_iters={ITERS})\n'
        'optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1))\n'
        'default_hooks = dict(logger=None, checkpoint=None)\n'
        'log_level = "ERROR"\n'
    )


def test_a_config_with_base_and_the_scoped_name(tmp_path):
    """The form docs/migrating-from-mmengine.md gives for configs with _base_: it inherits."""
    from mmengine.config import Config

    _base_config(tmp_path)
    (tmp_path / "config.py").write_text(
        '_base_ = ["./base.py"]\n'
        'custom_imports = dict(imports=["hwoptim.mmengine", "_mmengine_worker"])\n'
        'optim_wrapper = dict(type="hwoptim.AmpOptimWrapper", dtype="bfloat16", device="cpu")\n'
        f'work_dir = {str(tmp_path / "work")!r}\n'
        f'experiment_name = "cfg-{uuid.uuid4().hex[:8]}"\n'
    )
    runner = Runner.from_cfg(Config.fromfile(str(tmp_path / "config.py")))
    runner.train()
    assert type(runner.optim_wrapper) is hwoptim.AmpOptimWrapper
    assert runner.optim_wrapper.defaults["lr"] == 0.1  # the base's optimizer, merged
    assert set(runner.model.forward_dtypes) == {torch.bfloat16}


def test_a_python_config_that_imports_hwoptim_cannot_take_base(tmp_path):
    """Why the doc says so: a top-level import makes mmengine read the file as a lazy-import
    config, which refuses _base_ (its inheritance is read_base())."""
    from mmengine.config import Config

    _base_config(tmp_path)
    (tmp_path / "config.py").write_text(
        "import hwoptim\n"
        '_base_ = ["./base.py"]\n'
        "optim_wrapper = dict(type=hwoptim.AmpOptimWrapper, dtype='bfloat16', device='cpu')\n"
    )
    with pytest.raises(Exception, match="_base_"):
        Config.fromfile(str(tmp_path / "config.py"))


def test_compiled_updates_log_their_group_norms_and_compile_nothing_more():
    """compile_step with named groups under mmengine: each update's per-group norms reach
    the hub (pushed eagerly, outside the compiled update), with no recompile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    hub = MessageHub.get_instance(f"compiled-groups-{uuid.uuid4().hex}")
    model = Net()
    groups = [dict(params=model.fc1.parameters(), name="fc1"), dict(params=model.fc2.parameters(), name="fc2")]
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(groups, lr=0.1), clip_grad=dict(max_norm=1.0),
                                   compile_step=dict(backend="eager"))
    norms = []
    data = Data()
    for i in range(6):
        with wrapper.optim_context(model):
            loss = model(data.x[i : i + 1], data.y[i : i + 1])["loss"]
        wrapper.update_params(loss)
        norms.append(float(wrapper.last_grad_norms["fc2"]))
        if i == 1:
            graphs = int(counters["stats"]["unique_graphs"])
    assert int(counters["stats"]["unique_graphs"]) == graphs
    assert wrapper._guard.compiled is not None and wrapper._guard.compiled.compiled
    assert hub.get_scalar("train/grad_norm/fc2").data[0].tolist() == pytest.approx(norms)
    assert len(hub.get_scalar("train/grad_norm/fc1").data[0]) == 6
    torch._dynamo.reset()
