"""Resuming under mmengine's Runner with torch's safe loading on (weights_only=True, torch's
default since 2.6): no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, no weights_only=False.

hwoptim's own state dicts need no allowed global at all. mmengine's checkpoints do (its
MessageHub's HistoryBuffers, numpy arrays and scalars): hwoptim.mmengine allows those, through
checked stand-ins, only while mmengine loads a checkpoint, and a checkpoint holding anything
else is still refused. Every run here is a real Runner (tests/_mmengine_worker.py).
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _mmengine_worker import ITERS, ItemData, ItemNet, Net, StopAfter, dataloader, params_of, runner_kwargs
from helpers import assert_same
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

import hwoptim
import hwoptim.mmengine as bridge


@pytest.fixture(autouse=True)
def safe_loading_is_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch's default load, whatever the environment of the test run says; and nothing
    of hwoptim's allow list left behind by any test."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    before = list(torch.serialization.get_safe_globals())
    yield
    assert ours_allowed() == [], "hwoptim's allow list outlived the load"
    # nothing taken away (torch adds entries of its own as its modules are imported)
    assert set(before) <= set(torch.serialization.get_safe_globals())


def ours_allowed() -> list[Any]:
    allowed = set(torch.serialization.get_safe_globals())
    return [g for g in bridge.safe_globals() if g in allowed]


def load_with_nothing_allowed(data: bytes) -> Any:
    """torch.load(weights_only=True) with no global allowed beyond torch's own built-ins."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) == []
        return torch.load(io.BytesIO(data), weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)


def saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- hwoptim's own state dicts: nothing allowed ---------------------------------------------


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


WRAPPERS = {
    "plain": lambda m: hwoptim.OptimWrapper(_sgd(m)),
    "accumulating, clipped, partial grads": lambda m: hwoptim.OptimWrapper(
        _sgd(m), accumulative_counts=3, clip_grad=dict(max_norm=0.5), save_partial_grads=True),
    "value clipping, exact_skip": lambda m: hwoptim.OptimWrapper(
        _sgd(m), accumulative_counts=2, clip_grad=dict(type="value", clip_value=0.1),
        exact_skip=True, save_partial_grads=True),
    "compile_step": lambda m: hwoptim.OptimWrapper(
        _sgd(m), accumulative_counts=3, clip_grad=dict(max_norm=0.5), save_partial_grads=True,
        compile_step=dict(backend="eager")),
    "amp float16, dynamic scaler": lambda m: hwoptim.AmpOptimWrapper(
        torch.optim.AdamW(m.parameters(), lr=0.01), device="cpu", dtype="float16",
        accumulative_counts=3, clip_grad=dict(max_norm=1.0), save_partial_grads=True),
    "amp float16, fixed scale": lambda m: hwoptim.AmpOptimWrapper(
        _sgd(m), device="cpu", dtype="float16", loss_scale=512.0, accumulative_counts=2,
        save_partial_grads=True),
    "amp bfloat16": lambda m: hwoptim.AmpOptimWrapper(
        _sgd(m), device="cpu", dtype="bfloat16", accumulative_counts=3, save_partial_grads=True),
}


def _train(wrapper: Any, model: torch.nn.Module, steps: int, num_items: bool, overflow_at: int) -> None:
    """``steps`` micro-batches; the one at ``overflow_at`` has an infinite loss (a skip)."""
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        x = torch.randn(4, 2, generator=g)
        with wrapper.optim_context(model):
            loss = model(x).float().square().sum()
        if i == overflow_at:
            loss = loss * float("inf")
        if num_items:
            wrapper.update_params(loss, num_items=torch.tensor(4 + i))
        else:
            wrapper.update_params(loss / 4)


@pytest.mark.parametrize("num_items", [False, True], ids=["mean", "num_items"])
@pytest.mark.parametrize("steps", [4, 6], ids=["mid-window", "window-end"])
@pytest.mark.parametrize("name", list(WRAPPERS))
def test_hwoptim_state_dicts_load_with_nothing_allowed(name, steps, num_items):
    torch.manual_seed(0)  # the same weights in every order the tests run in
    model = torch.nn.Linear(2, 1)
    wrapper = WRAPPERS[name](model)
    wrapper.initialize_count_status(model, 0, 100)
    # an infinite loss where the wrapper skips it (a scaler, or clipping): skip counts
    skips = wrapper.loss_scaler is not None or wrapper.clip_grad_kwargs is not None
    _train(wrapper, model, steps, num_items, overflow_at=1 if skips else -1)
    state = wrapper.state_dict()
    if steps % wrapper._window.acc and wrapper._save_partial_grads:
        assert "grads" in state["hwoptim"]  # the partial window is in it
        assert ("items_window" in state["hwoptim"]) == num_items

    loaded = load_with_nothing_allowed(saved(state))

    assert_same(loaded, state)
    fresh_model = torch.nn.Linear(2, 1)
    fresh = WRAPPERS[name](fresh_model)
    fresh.initialize_count_status(fresh_model, 0, 100)
    fresh.load_state_dict(loaded)
    assert_same(fresh.state_dict(), state)


def test_an_optim_wrapper_dict_state_dict_loads_with_nothing_allowed():
    models = {name: torch.nn.Linear(2, 1) for name in ("amp", "partial")}
    wrappers = hwoptim.OptimWrapperDict(
        amp=WRAPPERS["amp float16, dynamic scaler"](models["amp"]),
        partial=WRAPPERS["accumulating, clipped, partial grads"](models["partial"]),
    )
    for name, wrapper in wrappers.items():
        wrapper.initialize_count_status(models[name], 0, 100)
        _train(wrapper, models[name], 4, num_items=True, overflow_at=1)
    state = wrappers.state_dict()
    assert "grads" in state["partial"]["hwoptim"] and "loss_scaler" in state["amp"]

    assert_same(load_with_nothing_allowed(saved(state)), state)


# -- the Runner: resume exactly, with safe loading on ----------------------------------------


SCHEDULE = dict(param_scheduler=dict(type="LinearLR", start_factor=0.2, by_epoch=False, begin=0, end=8))


def amp_items_config() -> dict[str, Any]:
    """float16 with a dynamic scaler, accumulation over 3, clipping, partial grads, num_items."""
    return dict(type=hwoptim.AmpOptimWrapper, device="cpu", dtype="float16", accumulative_counts=3,
                optimizer=dict(type="AdamW", lr=0.01), clip_grad=dict(max_norm=1.0),
                save_partial_grads=True)


def item_run(work_dir: Path, **overrides: Any) -> Runner:
    kwargs = runner_kwargs(work_dir, model=ItemNet(), optim_wrapper=amp_items_config(),
                           train_dataloader=dataloader(dataset=ItemData()), **SCHEDULE)
    kwargs.update(overrides)
    runner = Runner(**kwargs)
    runner.train()
    return runner


def interrupted(work_dir: Path, checkpoint_every: int, stop_at: int) -> Path:
    with pytest.raises(KeyboardInterrupt):
        item_run(work_dir, custom_hooks=[StopAfter(stop_at)],
                 default_hooks=dict(logger=None, checkpoint=dict(
                     type="CheckpointHook", interval=checkpoint_every, by_epoch=False)))
    return work_dir


@pytest.mark.parametrize(("checkpoint_every", "stop_at", "last"), [(4, 5, 4), (3, 7, 6)],
                         ids=["mid-window", "window-end"])
def test_a_runner_resumes_exactly_with_safe_loading_on(tmp_path, checkpoint_every, stop_at, last):
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    straight = item_run(tmp_path / "straight")
    work_dir = interrupted(tmp_path / "interrupted", checkpoint_every, stop_at)
    checkpoint = work_dir / f"iter_{last}.pth"
    partial = last % 3 != 0
    # what torch refuses on its own: the resume below really goes through the allow list
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(checkpoint, weights_only=True)
    with bridge.safe_loading():
        saved_state = torch.load(checkpoint, weights_only=True)
    assert ("grads" in saved_state["optimizer"]["hwoptim"]) == partial
    assert ("items_window" in saved_state["optimizer"]["hwoptim"]) == partial

    resumed = item_run(work_dir, resume=True)

    assert resumed.iter == straight.iter == ITERS
    assert_same(params_of(resumed.model), params_of(straight.model))
    assert_same(resumed.optim_wrapper.state_dict(), straight.optim_wrapper.state_dict())
    assert float(resumed.optim_wrapper.loss_scale) == float(straight.optim_wrapper.loss_scale)
    scalars, expected = resumed.message_hub.log_scalars, straight.message_hub.log_scalars
    for key in ("train/grad_norm", "train/loss_scale", "train/item_loss", "train/loss", "train/lr"):
        assert scalars[key].data[0].tolist() == expected[key].data[0].tolist(), key
    # the stand-ins became mmengine's own HistoryBuffers, as an unsafe load gives
    assert type(scalars["train/loss"]) is HistoryBuffer
    assert ours_allowed() == []  # only while mmengine loaded the checkpoint


def test_a_checkpoint_of_mmengines_own_wrapper_resumes_with_safe_loading_on(tmp_path):
    config = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
                  accumulative_counts=3, clip_grad=dict(max_norm=0.5))
    run = dict(default_hooks=dict(logger=None, checkpoint=dict(type="CheckpointHook", interval=3,
                                                               by_epoch=False)), **SCHEDULE)
    straight = Runner(**runner_kwargs(tmp_path / "straight", optim_wrapper=config, **run))
    straight.train()
    work_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Runner(**runner_kwargs(work_dir, optim_wrapper=config, custom_hooks=[StopAfter(7)], **run)).train()
    resumed = Runner(**runner_kwargs(work_dir, resume=True, optim_wrapper=dict(
        config, type=hwoptim.OptimWrapper), **run))
    resumed.train()
    assert type(resumed.optim_wrapper) is hwoptim.OptimWrapper
    assert_same(params_of(resumed.model), params_of(straight.model))


def test_a_checkpoint_with_numpy_metadata_resumes(tmp_path):
    """Runtime info and dataset meta as mmengine writes them: numpy scalars and arrays."""
    work_dir = interrupted(tmp_path / "run", checkpoint_every=3, stop_at=4)
    path = work_dir / "iter_3.pth"
    with bridge.safe_loading():
        checkpoint = torch.load(path, weights_only=True)
    assert isinstance(checkpoint["message_hub"]["runtime_info"]["eta"], np.floating)  # mmengine's own
    checkpoint["message_hub"]["runtime_info"]["numpy"] = [np.int64(3), np.float32(0.5),
                                                          np.arange(4, dtype=np.uint8), np.bool_(True)]
    torch.save(checkpoint, path)
    resumed = item_run(work_dir, resume=True)
    assert resumed.iter == ITERS
    assert resumed.message_hub.get_info("numpy")[2].tolist() == [0, 1, 2, 3]


# -- anything else is refused ---------------------------------------------------------------


MARKER = "hwoptim-safe-load-was-run"


class RunsCode:
    """Unpickling this runs code (here: creates a file named MARKER)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({MARKER!r}, 'w').close()",))


class RunsShell:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {MARKER}",))


class Unknown:
    """A class of no checkpoint's: refused by name."""


class Fetches:
    """A getattr that is not one of HistoryBuffer's statistics methods."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (self.owner, self.name))


class Buffer:
    """Pickles as a HistoryBuffer with the given state (mmengine's form) or arguments
    (DeviceHistoryBuffer's form)."""

    def __init__(self, state: Any = None, args: Any = None) -> None:
        self.state, self.args = state, args

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # what pickle checks __newobj__'s class against
        return HistoryBuffer

    def __reduce__(self) -> tuple[Any, ...]:
        if self.args is not None:
            return (HistoryBuffer, self.args)
        if self.state is None:
            return (copyreg.__newobj__, (HistoryBuffer,))
        return (copyreg.__newobj__, (HistoryBuffer,), self.state)


def _buffer_state(**changes: Any) -> dict[str, Any]:
    state = dict(max_length=10, _log_history=np.zeros(2), _count_history=np.ones(2, dtype=np.int64),
                 statistics_methods=dict(mean=HistoryBuffer.mean))
    state.update(changes)
    return state


EVIL = {
    "exec in __reduce__": (RunsCode(), "GLOBAL exec"),
    "os.system in __reduce__": (RunsShell(), "is blocked"),
    "an unknown class": (Unknown(), "Unknown"),
    "getattr of a numpy method": (Fetches(np.ndarray, "tofile"), "hwoptim.mmengine refused"),
    "getattr of another HistoryBuffer attribute": (Fetches(HistoryBuffer, "__init__"), "statistics methods"),
    "getattr of a tensor method": (Fetches(torch.Tensor, "tolist"), "hwoptim.mmengine refused"),
    "a statistics method replaced": (Buffer(_buffer_state(statistics_methods=dict(mean=np.dtype))),
                                     "not the one registered"),
    "an extra attribute in a HistoryBuffer": (Buffer(_buffer_state(update=np.dtype)), "keys"),
    "a HistoryBuffer of objects": (Buffer(args=(["x", "y"], [1, 1], 10)), "must hold numbers"),
    "a HistoryBuffer of too many arguments": (Buffer(args=([1], [1], 10, 0)), "at most 3"),
    "a HistoryBuffer without its state": (Buffer(), "without its state"),
    "a HistoryBuffer of a 2-d array": (Buffer(_buffer_state(_log_history=np.zeros((2, 2)))), "1-d"),
    "an object array": (np.array([1, "x"], dtype=object), "ObjectDType"),
}


@pytest.mark.parametrize("where", ["runtime_info", "log_scalars"])
@pytest.mark.parametrize("name", list(EVIL))
def test_a_crafted_checkpoint_is_refused_under_the_runner(tmp_path, monkeypatch, name, where):
    monkeypatch.chdir(tmp_path)  # where MARKER would appear
    work_dir = interrupted(tmp_path / "run", checkpoint_every=3, stop_at=4)
    path = work_dir / "iter_3.pth"
    with bridge.safe_loading():
        checkpoint = torch.load(path, weights_only=True)
    evil, message = EVIL[name]
    checkpoint["message_hub"][where]["train/evil"] = evil
    torch.save(checkpoint, path)
    assert not (tmp_path / MARKER).exists()  # saving ran nothing

    with pytest.raises(pickle.UnpicklingError, match=message):
        item_run(work_dir, resume=True)

    assert not (tmp_path / MARKER).exists()
    # refused before anything was resumed, and the allow list is gone again (the fixture)


def test_the_allow_list_is_scoped_to_mmengines_checkpoint_loading(tmp_path):
    work_dir = interrupted(tmp_path / "run", checkpoint_every=3, stop_at=4)
    path = work_dir / "iter_3.pth"
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(path, weights_only=True)  # outside mmengine: torch's own rules
    # a global the user allowed before stays allowed after mmengine's load
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.ndarray])
    try:
        from mmengine.runner import load_checkpoint

        load_checkpoint(Net(), str(path))  # mmengine's load of a model's weights: the same loaders
        assert np.ndarray in torch.serialization.get_safe_globals()
        assert [g for g in ours_allowed() if g is not np.ndarray] == []
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_re_importing_the_bridge_does_not_wrap_mmengines_loaders_twice():
    import importlib

    from mmengine.runner.checkpoint import CheckpointLoader

    importlib.reload(bridge)
    for loader in CheckpointLoader._schemes.values():
        assert loader._hwoptim_safe_loading
        assert not getattr(loader.__wrapped__, "_hwoptim_safe_loading", False)


# -- the example ----------------------------------------------------------------------------


def test_the_mmengine_example_resumes_exactly_with_safe_loading_on(tmp_path):
    """Each run a process of its own, as a user runs it (in one process, runs started in
    the same second would share mmengine's MessageHub, which is named by the time)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "mmengine_runner.py"
    common = ["--accum", "2", "--checkpoint-every", "2", "--log-every", "2", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    outputs = []
    for steps, run, resume in ((8, "straight", []), (4, "resumed", []), (8, "resumed", ["--resume"])):
        result = subprocess.run(
            [sys.executable, str(example), *common, "--steps", str(steps),
             "--work-dir", str(tmp_path / run), *resume],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "resumed epoch: 0, iter: 4" in outputs[2] and "done: 8 iterations" in outputs[2]

    with bridge.safe_loading():
        straight, resumed = (torch.load(tmp_path / run / "iter_8.pth", weights_only=True)
                             for run in ("straight", "resumed"))
    assert resumed["meta"]["iter"] == 8
    for key in ("state_dict", "optimizer", "param_schedulers"):
        assert_same(resumed[key], straight[key], key)
    hubs = straight["message_hub"]["log_scalars"], resumed["message_hub"]["log_scalars"]
    for key in ("train/grad_norm", "train/loss_scale", "train/loss", "train/lr"):
        assert [h[key].data[0].tolist() for h in hubs] == [hubs[0][key].data[0].tolist()] * 2, key
