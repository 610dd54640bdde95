"""The conformance suite: what every backend, built-in or plugin, must do.

Subclass ``BackendConformance`` in a test module and name the backend; pytest then runs
the whole suite against it::

    from hwoptim.testing.conformance import BackendConformance

    class TestNpuConformance(BackendConformance):
        backend_name = "npu"

Each test runs in two modes: "mocked", through ``hwoptim.testing.mock_backend`` (any
machine, tensors on the CPU), and "real", on the hardware itself, carrying the pytest
marker ``hardware_marker`` and skipped, with the backend's own reason, where the hardware
is absent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, cast

import pytest
import torch

from hwoptim.amp import AmpOptimWrapper
from hwoptim.backends.base import Backend, dtype_name
from hwoptim.backends.registry import get_backend
from hwoptim.testing.mock import mock_backend

MOCKED = "mocked"
REAL = "real"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the CPU can stand in for under a mock: CPU autocast knows only these.
_CPU_AUTOCAST = (torch.float16, torch.bfloat16, torch.float32)


class _SyncRecorder(torch.nn.Module):
    """A DDP-like model: ``no_sync()`` turns sync off; records the flag at each backward."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.require_sync = True
        self.sync_at_backward: list[bool] = []
        for param in module.parameters():
            param.register_hook(self._record)  # type: ignore[no-untyped-call]
            break  # one hook per backward is enough

    def _record(self, grad: torch.Tensor) -> torch.Tensor:
        self.sync_at_backward.append(self.require_sync)
        return grad

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.require_sync = False
        try:
            yield
        finally:
            self.require_sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.module(x))


class BackendConformance:
    """The suite. Set ``backend_name``; override ``real_backend`` if it is not found by name."""

    #: the backend under test (its registry name, or its stand-in name for mock_backend)
    backend_name: ClassVar[str] = ""
    #: marker of the "real" runs; None derives it: "gpu" for cuda, none for cpu, else the name
    hardware_marker: ClassVar[str | None] = None
    #: the modes to run; a suite for a device that cannot be mocked may keep only REAL
    modes: ClassVar[tuple[str, ...]] = (MOCKED, REAL)
    #: devices the mock pretends to have (two, so that indices are exercised)
    mock_device_count: ClassVar[int] = 2

    # -- how a backend is obtained --------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "conformance_mode" not in metafunc.fixturenames:
            return
        if not self.backend_name:
            raise TypeError(f"{type(self).__name__} must set backend_name")
        marker = self._hardware_marker()
        params = []
        for mode in self.modes:
            marks = []
            if mode == REAL and marker:
                _declare_marker(metafunc.config, marker)
                marks.append(getattr(pytest.mark, marker))
            params.append(pytest.param(mode, marks=marks, id=mode))
        metafunc.parametrize("conformance_mode", params)

    def real_backend(self) -> Backend:
        """The backend on real hardware; skips the test where there is none."""
        try:
            return get_backend(self.backend_name)
        except RuntimeError as exc:
            pytest.skip(f"no {self.backend_name} hardware here: {exc}")

    @contextlib.contextmanager
    def backend_in(self, mode: str) -> Iterator[Backend]:
        """The backend under test in ``mode``, for as long as the block lasts."""
        if mode == MOCKED:
            with mock_backend(self.backend_name, device_count=self.mock_device_count) as mock:
                yield mock.backend
        else:
            yield self.real_backend()

    @pytest.fixture
    def conformance_backend(self, conformance_mode: str) -> Iterator[Backend]:
        with self.backend_in(conformance_mode) as backend:
            yield backend

    def _hardware_marker(self) -> str:
        if self.hardware_marker is not None:
            return self.hardware_marker
        return {"cuda": "gpu", "cpu": ""}.get(self.backend_name, self.backend_name)

    # -- the suite ------------------------------------------------------------------------

    def test_availability_never_raises(self, conformance_mode: str) -> None:
        with self.backend_in(conformance_mode) as backend:
            assert backend.is_available() is True
            cls = type(backend)
        # Outside any mock: whatever this machine has, an answer and never an exception.
        fresh = cls()
        available = fresh.is_available()
        assert isinstance(available, bool)
        if not available:
            reason = fresh.unavailable_reason()
            assert isinstance(reason, str) and reason

    def test_devices_and_counts(self, conformance_backend: Backend, conformance_mode: str) -> None:
        backend = conformance_backend
        count = backend.device_count()
        assert isinstance(count, int) and count >= 1
        device = backend.device()
        assert isinstance(device, torch.device)
        assert device.type == ("cpu" if conformance_mode == MOCKED else backend.device_type)
        current = backend.current_device()
        assert 0 <= current < count
        backend.set_device(current)
        backend.synchronize()
        assert torch.ones(2, device=device).device.type == device.type
        last = get_backend(f"{backend.name}:{count - 1}")
        assert last.index == count - 1
        with pytest.raises(ValueError, match="does not exist"):
            get_backend(f"{backend.name}:{count}")

    def test_manual_seed_makes_randomness_repeat(self, conformance_backend: Backend) -> None:
        device = conformance_backend.device()
        conformance_backend.manual_seed(1234)
        first = torch.randn(8, device=device)
        conformance_backend.manual_seed(1234)
        assert torch.equal(first, torch.randn(8, device=device))

    @pytest.mark.parametrize("dtype", _DTYPES, ids=dtype_name)
    def test_autocast_gives_the_promised_dtype(
        self, conformance_backend: Backend, conformance_mode: str, dtype: torch.dtype
    ) -> None:
        backend = conformance_backend
        if dtype not in backend.amp_dtypes:
            with pytest.raises(ValueError, match="supports"):
                backend.resolve_dtype(dtype)
            return
        if conformance_mode == MOCKED and dtype not in _CPU_AUTOCAST:
            # CPU autocast cannot stand in for it (float64 on cuda): check what the CPU can,
            # that the backend accepts the dtype, and leave the matmul to the unmocked run.
            assert backend.resolve_dtype(dtype) == dtype
            assert backend.resolve_dtype(dtype_name(dtype)) == dtype
            return
        x = torch.randn(8, 8, device=backend.device())
        with backend.autocast(backend.resolve_dtype(dtype)):
            y = x @ x
        assert y.dtype == dtype  # float32 means autocast off: the matmul stays float32

    def test_default_dtype_is_supported_and_used(self, conformance_backend: Backend) -> None:
        backend = conformance_backend
        assert backend.default_amp_dtype in backend.amp_dtypes
        assert backend.resolve_dtype(None) == backend.default_amp_dtype
        x = torch.randn(4, 4, device=backend.device())
        with backend.autocast():
            assert (x @ x).dtype == backend.default_amp_dtype

    def test_grad_scaler_state_round_trip(self, conformance_backend: Backend) -> None:
        backend = conformance_backend
        scaler = backend.grad_scaler(init_scale=1024.0, growth_interval=3)
        param = torch.nn.Parameter(torch.ones(3, device=backend.device()))
        optimizer = torch.optim.SGD([param], lr=0.1)
        scaled = scaler.scale((param * 2).sum())
        assert scaled.item() == pytest.approx(6 * 1024)
        scaled.backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()
        assert torch.allclose(param.detach().cpu(), torch.full((3,), 0.8))  # unscaled grad 2
        state = scaler.state_dict()
        assert state["scale"] == 1024.0
        assert state["growth_interval"] == 3
        assert state["_growth_tracker"] == 1
        restored = backend.grad_scaler()
        restored.load_state_dict(state)
        assert restored.state_dict() == state

    def test_sharded_grad_scaler_builds(self, conformance_backend: Backend) -> None:
        scaler = conformance_backend.grad_scaler(sharded=True, init_scale=256.0)
        assert scaler.is_enabled()
        assert scaler.state_dict()["scale"] == 256.0

    def test_training_run_loss_falls(self, conformance_backend: Backend) -> None:
        backend = conformance_backend
        device = backend.device()
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(6, 32, 8, generator=generator)
        targets = inputs @ torch.randn(8, 1, generator=generator)
        inputs, targets = inputs.to(device), targets.to(device)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        ).to(device)
        wrapper = AmpOptimWrapper(
            torch.optim.AdamW(model.parameters(), lr=2e-2),
            device=backend,
            accumulative_counts=4,
            clip_grad=dict(max_norm=1.0),
        )
        assert wrapper.backend is backend and wrapper.device == device
        epochs = 10
        total = epochs * len(inputs)  # 60 micro-batches: 15 windows of 4
        wrapper.initialize_count_status(model, 0, total)

        def full_loss() -> float:
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(model(inputs), targets))

        before = full_loss()
        for _ in range(epochs):
            for x, y in zip(inputs, targets):
                with wrapper.optim_context(model):
                    loss = torch.nn.functional.mse_loss(model(x).float(), y)
                wrapper.update_params(loss)
        after = full_loss()
        assert wrapper.inner_count == total
        assert wrapper.last_grad_norm is not None
        assert after < 0.5 * before, f"loss {before:.4f} -> {after:.4f} did not fall enough"

    def test_no_sync_skips_sync_until_the_window_ends(self, conformance_backend: Backend) -> None:
        backend = conformance_backend
        # On the device first: on out-of-tree devices .to() makes new parameters, whose
        # hooks (the recorder's) would be lost.
        model = _SyncRecorder(torch.nn.Linear(4, 1).to(backend.device()))
        with backend.no_sync(model):
            assert model.require_sync is False
        assert model.require_sync is True
        wrapper = AmpOptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.1), device=backend, accumulative_counts=3
        )
        wrapper.initialize_count_status(model, 0, 3)
        for _ in range(3):
            with wrapper.optim_context(model):
                loss = model(torch.randn(2, 4, device=backend.device())).float().sum()
            wrapper.update_params(loss)  # after the block: the skip must still hold here
        assert model.sync_at_backward == [False, False, True]

    def test_unknown_dtype_is_an_error_naming_what_works(
        self, conformance_backend: Backend
    ) -> None:
        backend = conformance_backend
        with pytest.raises(ValueError, match="float8"):
            backend.resolve_dtype("float8")
        with pytest.raises(ValueError, match=f"{backend.name!r}.*supports"):
            backend.resolve_dtype(torch.int8)
        with pytest.raises(TypeError, match="dtype"):
            backend.resolve_dtype(16)  # type: ignore[arg-type]
        param = torch.nn.Parameter(torch.ones(1, device=backend.device()))
        with pytest.raises(ValueError, match="float8"):
            AmpOptimWrapper(torch.optim.SGD([param], lr=0.1), device=backend, dtype="float8")

    def test_describe_reports_the_device(self, conformance_backend: Backend) -> None:
        backend = conformance_backend
        facts: dict[str, Any] = backend.describe()
        assert facts["name"] == backend.name
        assert facts["available"] is True and facts["reason"] is None
        assert facts["device_count"] == backend.device_count() == len(facts["devices"])
        assert facts["default_dtype"] in facts["amp_dtypes"]
        assert isinstance(facts["dist_backend"], str) and facts["dist_backend"]


def _declare_marker(config: pytest.Config, marker: str) -> None:
    """Register ``marker`` unless the project already did, so it is never 'unknown'."""
    declared = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    if marker not in declared:
        config.addinivalue_line("markers", f"{marker}: needs a real {marker} device (hwoptim)")
