"""update_params never reads a device tensor back to the host (DESIGN.md, the no-sync contract).

On a GPU every ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (an ``if t:``),
``.tolist()`` or ``.cpu()`` of a device tensor waits for the device to drain its queue. The
CPU has no queue, so these tests look for the calls themselves: ``HostSyncDetector`` patches
those Tensor methods and records each call with the module of the Python frame that made it,
which separates hwoptim's own calls from torch's internals (GradScaler's ``.item()`` for a
non-fused optimizer is torch's, and allowed).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
from torch import nn

import hwoptim
import hwoptim._guard

#: the Tensor methods behind .item(), .tolist(), .cpu(), .numpy(), float(), int(), bool()
#: and the implicit int of indexing (__index__); each one waits for the device
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@dataclasses.dataclass(frozen=True)
class SyncCall:
    method: str
    module: str  # __name__ of the module whose code made the call
    filename: str
    lineno: int

    def __str__(self) -> str:
        return f"{self.method} from {self.module} ({self.filename}:{self.lineno})"


class HostSyncDetector:
    """Records every call of a syncing Tensor method while entered, with its caller.

    Patching ``torch.Tensor`` covers Parameters and every other subclass; calls made from
    C++ are not seen (they are torch's, and not ours to count). Restores the methods on exit.
    """

    def __init__(self) -> None:
        self.calls: list[SyncCall] = []
        self._saved: dict[str, Any] = {}

    def by(self, package: str) -> list[SyncCall]:
        """The calls made by code of ``package`` (its modules and subpackages)."""
        return [c for c in self.calls if c.module == package or c.module.startswith(package + ".")]

    def __enter__(self) -> HostSyncDetector:
        for name in SYNC_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, name)  # the method is inherited from torch._C.TensorBase
            else:
                setattr(torch.Tensor, name, saved)
        self._saved.clear()

    def _recording(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        calls = self.calls

        def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # bool(t), float(t), `if t:` call this from C: frame 1 is still the caller's code
            caller = sys._getframe(1)
            calls.append(SyncCall(
                name, caller.f_globals.get("__name__", "?"), caller.f_code.co_filename,
                caller.f_lineno,
            ))
            return original(tensor, *args, **kwargs)

        return recording


# -- the training runs under test --------------------------------------------------------


def _adamw(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)


def _adamw_groups(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """A param group per layer, named: the per-group norms and flags are computed too."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups = [{"params": list(m.parameters()), "name": f"layer{i}"} for i, m in enumerate(layers)]
    return torch.optim.AdamW(groups, lr=1e-2, fused=fused)


CONFIGS: dict[str, Callable[[nn.Module], hwoptim.OptimWrapper]] = {
    "fp32": lambda m: hwoptim.OptimWrapper(
        _adamw(m, fused=False), accumulative_counts=2, clip_grad=dict(max_norm=1.0)
    ),
    "fp32-fused": lambda m: hwoptim.OptimWrapper(
        _adamw(m, fused=True), accumulative_counts=2, clip_grad=dict(max_norm=1.0)
    ),
    "fp32-exact-skip": lambda m: hwoptim.OptimWrapper(
        _adamw(m, fused=False), accumulative_counts=2, clip_grad=dict(max_norm=1.0), exact_skip=True
    ),
    "fp32-value-clip": lambda m: hwoptim.OptimWrapper(
        _adamw(m, fused=False), accumulative_counts=2, clip_grad=dict(type="value", clip_value=0.5)
    ),
    "bf16": lambda m: hwoptim.AmpOptimWrapper(
        _adamw(m, fused=False), device="cpu", dtype="bfloat16", accumulative_counts=2,
        clip_grad=dict(max_norm=1.0),
    ),
    "fp16-fused": lambda m: hwoptim.AmpOptimWrapper(
        _adamw(m, fused=True), device="cpu", dtype="float16", accumulative_counts=2,
        clip_grad=dict(max_norm=1.0),
    ),
    "fp32-groups-per-group-clip": lambda m: hwoptim.OptimWrapper(
        _adamw_groups(m, fused=False), accumulative_counts=2, clip_grad=dict(max_norm=1.0, per_group=True)
    ),
    "fp16-fused-groups": lambda m: hwoptim.AmpOptimWrapper(
        _adamw_groups(m, fused=True), device="cpu", dtype="float16", accumulative_counts=2,
        clip_grad=dict(max_norm={"layer0": 1.0}),
    ),
    "fp32-groups-compiled": lambda m: hwoptim.OptimWrapper(
        _adamw_groups(m, fused=False), accumulative_counts=2, clip_grad=dict(max_norm=1.0, per_group=True),
        compile_step=dict(backend="eager"),
    ),
    # compile_step: dynamo traces the same code (the eager backend skips code generation)
    "fp32-compiled": lambda m: hwoptim.OptimWrapper(
        _adamw(m, fused=False), accumulative_counts=2, clip_grad=dict(max_norm=1.0),
        compile_step=dict(backend="eager"),
    ),
    "fp16-fused-compiled": lambda m: hwoptim.AmpOptimWrapper(
        _adamw(m, fused=True), device="cpu", dtype="float16", accumulative_counts=2,
        clip_grad=dict(max_norm=1.0), compile_step=dict(backend="eager"),
    ),
}


def _batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Six micro-batches (three updates at accumulation 2); the third update overflows."""
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        x = torch.randn(4, 8, generator=generator)
        if i == 4:
            x[0, 0] = float("inf")  # a non-finite gradient: the guard's path runs too
        yield x, torch.randn(4, 2, generator=generator)


def train(
    wrapper: hwoptim.OptimWrapper, model: nn.Module, detector: HostSyncDetector,
    num_items: str | None = None,
) -> None:
    """mmengine's loop; the detector watches optim_context, the forward and update_params.

    ``num_items`` "tensor" or "int": the loss is summed over the micro-batch's rows, and
    its row count (a device tensor, or a Python int) goes with it.
    """
    wrapper.initialize_count_status(model, 0, 6)
    for x, y in _batches():
        rows = (y[:, 0] == y[:, 0]).sum() if num_items == "tensor" else len(y)  # int64 tensor
        with detector:
            with wrapper.optim_context(model):
                # the loss in float32: torch 2.9 and older cannot backward mse_loss(bf16, fp32)
                out = model(x).float()
            if num_items is None:
                wrapper.update_params(nn.functional.mse_loss(out, y))
            else:
                # a sum over rows, kept as small as the mean: fp16's first scale (2**16)
                # overflows a summed loss's gradients, and three updates would all skip
                loss = nn.functional.mse_loss(out, y, reduction="sum") / y.numel()
                wrapper.update_params(loss, num_items=rows)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


# -- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_params_makes_no_host_sync(config: str) -> None:
    model = _model()
    wrapper = CONFIGS[config](model)
    before = [p.detach().clone() for p in model.parameters()]
    detector = HostSyncDetector()

    train(wrapper, model, detector)

    assert detector.by("hwoptim") == [], "\n".join(map(str, detector.by("hwoptim")))
    # Not vacuous: the run updated the parameters, and never with a non-finite value.
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(torch.isfinite(p).all() for p in after)


@pytest.mark.parametrize("num_items", ["tensor", "int"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_update_params_with_num_items_makes_no_host_sync(config: str, num_items: str) -> None:
    """The item count is summed on the device (a tensor count) or on the host (an int
    count), the gradients divided by it there; last_loss is left on the device."""
    model = _model()
    wrapper = CONFIGS[config](model)
    before = [p.detach().clone() for p in model.parameters()]
    detector = HostSyncDetector()

    train(wrapper, model, detector, num_items)

    assert detector.by("hwoptim") == [], "\n".join(map(str, detector.by("hwoptim")))
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(torch.isfinite(p).all() for p in after)
    assert wrapper.last_loss is not None


@pytest.mark.parametrize("config", ["fp32-fused", "fp16-fused", "fp16-fused-compiled", "fp16-fused-groups"])
def test_with_a_fused_optimizer_nothing_under_update_params_syncs_with_num_items(
    config: str,
) -> None:
    model = _model()
    detector = HostSyncDetector()
    train(CONFIGS[config](model), model, detector, "tensor")
    assert detector.calls == [], "\n".join(map(str, detector.calls))


@pytest.mark.parametrize("config", ["fp32-fused", "fp16-fused", "fp16-fused-compiled", "fp16-fused-groups"])
def test_with_a_fused_optimizer_nothing_under_update_params_syncs(config: str) -> None:
    """DESIGN: "with a fused optimizer there is none", torch's code included (clip, unscale,
    the fused step taking found_inf as a tensor, the scale update). A non-fused torch
    optimizer reads its step counter with .item(), but keeps that counter on the host, so
    it costs no device sync; those configurations are checked for hwoptim's calls only."""
    model = _model()
    detector = HostSyncDetector()
    train(CONFIGS[config](model), model, detector)
    assert detector.calls == [], "\n".join(map(str, detector.calls))


def test_the_only_sync_of_fp16_with_a_non_fused_optimizer_is_torch_grad_scaler() -> None:
    """GradScaler.step reads found_inf with .item() when the optimizer cannot take it as a
    tensor: the one sync DESIGN.md allows. The detector sees it and attributes it to torch."""
    model = _model()
    wrapper = hwoptim.AmpOptimWrapper(
        _adamw(model, fused=False), device="cpu", dtype="float16", accumulative_counts=2,
        clip_grad=dict(max_norm=1.0),
    )
    detector = HostSyncDetector()
    train(wrapper, model, detector)
    assert detector.by("hwoptim") == []
    modules = {c.module for c in detector.calls}
    assert "torch.amp.grad_scaler" in modules
    # torch.optim's host-side step counter (see above) is the only other caller
    assert modules <= {"torch.amp.grad_scaler", "torch.optim.optimizer"}


# -- the detector catches what it must ----------------------------------------------------

INJECTED_SYNCS = {
    "item": "found_inf.item()",
    "float": "float(found_inf)",
    "int": "int(found_inf)",
    "bool": "bool(found_inf)",
    "if": "if found_inf:\n        pass",
    "tolist": "found_inf.tolist()",
    "cpu": "found_inf.cpu()",
}


def _inject_into_wrapper(monkeypatch: pytest.MonkeyPatch, statement: str) -> None:
    """Replace the guard's update body (run by every configuration here: all clip) with a
    version that also runs ``statement`` on the clipped norm, as code of hwoptim._guard (its
    globals), the way a regression would be written there."""
    source = (
        "def _body(self, params, found, empty, kwargs, step):\n"
        "    norm = _original_body(self, params, found, empty, kwargs, step)\n"
        "    found_inf = nonfinite_flag(norm)\n"  # 0.0 or 1.0: int() and bool() work on it
        f"    {statement}\n"
        "    return norm\n"
    )
    namespace = dict(vars(hwoptim._guard))  # __name__ == "hwoptim._guard"
    namespace["_original_body"] = hwoptim._guard.Guard._body
    exec(compile(source, hwoptim._guard.__file__, "exec"), namespace)
    monkeypatch.setattr(hwoptim._guard.Guard, "_body", namespace["_body"])


@pytest.mark.parametrize("config", ["fp32", "bf16", "fp16-fused"])
@pytest.mark.parametrize("kind", list(INJECTED_SYNCS))
def test_detector_catches_a_sync_injected_into_the_wrapper(
    monkeypatch: pytest.MonkeyPatch, config: str, kind: str
) -> None:
    _inject_into_wrapper(monkeypatch, INJECTED_SYNCS[kind])
    model = _model()
    detector = HostSyncDetector()
    train(CONFIGS[config](model), model, detector)
    caught = detector.by("hwoptim")
    assert caught, f"the injected {INJECTED_SYNCS[kind]!r} went unnoticed"
    assert {c.module for c in caught} == {"hwoptim._guard"}


def test_detector_ignores_syncs_outside_hwoptim() -> None:
    with HostSyncDetector() as detector:
        value = torch.ones(()).item()
    assert value == 1.0
    assert [c.method for c in detector.calls] == ["item"]
    assert detector.calls[0].module == __name__
    assert detector.by("hwoptim") == []


def test_detector_restores_the_tensor_methods() -> None:
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    with HostSyncDetector():
        assert torch.Tensor.item is not originals["item"]
    assert {name: getattr(torch.Tensor, name) for name in SYNC_METHODS} == originals
    assert all(name not in torch.Tensor.__dict__ for name in SYNC_METHODS)
