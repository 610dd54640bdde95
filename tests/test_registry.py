"""The registry: how "auto" chooses among present devices, HWOPTIM_DEVICE, entry-point
plugins (a broken one warns and breaks nothing), overrides and unavailable messages."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import hwoptim
from hwoptim import Backend, get_backend, list_backends, register_backend
from hwoptim.backends import registry
from hwoptim.backends.cpu import CpuBackend
from hwoptim.backends.cuda import CudaBackend
from hwoptim.backends.registry import backend_origin, plugin_errors, unregister_backend
from hwoptim.testing import mock_backend


@contextlib.contextmanager
def present(*names: str, device_count: int = 1) -> Iterator[None]:
    """These backends' hardware is "present" (mocked), but none is forced on auto."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock_backend(name, device_count=device_count, select=False))
        yield


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


# -- device="auto" ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("mps", "npu", "xpu", "cuda"), "cuda"),
        (("mps", "npu", "xpu"), "xpu"),
        (("mps", "npu"), "npu"),
        (("npu", "mps"), "npu"),
        (("mps",), "mps"),
        ((), "cpu"),
    ],
)
def test_auto_takes_the_present_backend_of_highest_priority(
    names: tuple[str, ...], expected: str
) -> None:
    with present(*names):
        assert get_backend("auto").name == expected
        assert get_backend(None).name == expected
    assert get_backend("auto").name == "cpu"


def test_auto_order_is_cuda_xpu_npu_mps_then_cpu_last() -> None:
    ordered = [name for name in list_backends() if name in {"cuda", "xpu", "npu", "mps", "cpu"}]
    assert ordered == ["cuda", "xpu", "npu", "mps", "cpu"]
    assert list(list_backends())[-1] == "cpu"


def test_torchs_current_accelerator_comes_before_priority() -> None:
    # The generic stand-in makes torch report a PrivateUse1 accelerator no backend claims.
    with present("cuda", "generic"):
        assert get_backend("auto").name == "privateuseone"


def test_hwoptim_device_wins_over_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    with present("cuda", "npu", "mps", device_count=2):
        monkeypatch.setenv(registry.ENV_VAR, "mps")
        assert get_backend("auto").name == "mps"
        monkeypatch.setenv(registry.ENV_VAR, "npu:1")
        backend = get_backend("auto")
        assert (backend.name, backend.index) == ("npu", 1)
        monkeypatch.setenv(registry.ENV_VAR, "cpu")
        assert get_backend("auto").name == "cpu"
        monkeypatch.setenv(registry.ENV_VAR, "auto")
        assert get_backend("auto").name == "cuda"


def test_hwoptim_device_naming_an_absent_device_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "npu")
    with present("cuda"), pytest.raises(RuntimeError, match=r"HWOPTIM_DEVICE='npu'.*torch_npu"):
        get_backend("auto")
    monkeypatch.setenv(registry.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=r"HWOPTIM_DEVICE='tpu': unknown device 'tpu'"):
        get_backend("auto")


def test_a_selecting_mock_wins_over_hwoptim_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, "cpu")
    with mock_backend("npu"):
        assert get_backend("auto").name == "npu"


# -- names, indices, messages ----------------------------------------------------------------


def test_unknown_name_lists_the_registered_backends() -> None:
    message = r"unknown device 'tpu'; registered backends: .*'mps'.*'npu'"
    with pytest.raises(ValueError, match=message):
        get_backend("tpu")


@pytest.mark.parametrize("spec", ["meta", "distributed", "backends"])
def test_torch_names_that_are_no_accelerator_are_unknown(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        get_backend(spec)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("npu", r'torch_npu is not installed.*pip install "hwoptim\[npu\]".*CANN'),
        ("xpu", r"no XPU support.*download\.pytorch\.org/whl/xpu"),
        ("mps", r"no MPS support.*macOS 12\.3\+ on Apple silicon"),
        ("cuda", r"CPU-only build.*CUDA or ROCm build"),
        ("privateuseone", r"no usable 'privateuseone' accelerator.*current accelerator is none"),
    ],
)
def test_an_unavailable_backend_says_what_is_missing(
    name: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = list_backends().get(name)
    if cls is not None and cls().is_available():
        pytest.skip(f"{name} is available here")
    if name == "npu" and importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    # What a CPU-only build of torch says, also on a CUDA build without a GPU (whose
    # torch.accelerator names cuda all the same).
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    with pytest.raises(RuntimeError, match=rf"the '{name}' backend is not available: .*{message}"):
        get_backend(name)


def test_an_index_past_the_devices_is_an_error() -> None:
    with present("npu", device_count=2):
        assert get_backend("npu:1").index == 1
        assert get_backend(" NPU:0 ").index == 0
        with pytest.raises(ValueError, match=r"device npu:2 does not exist.*2 npu device\(s\)"):
            get_backend("npu:2")


def test_a_torch_device_resolves_like_its_string() -> None:
    with present("generic", device_count=2):
        backend = get_backend(torch.device("privateuseone", 1))
        assert (backend.name, backend.index) == ("privateuseone", 1)


# -- plugins through the entry point -----------------------------------------------------------


def test_plugins_register_through_the_entry_point_with_their_package(plugin_dist: None) -> None:
    with pytest.warns(RuntimeWarning):
        backends = list_backends()
    assert backends["alpha"].dist_backend == "alphaccl"
    assert "beta" in backends  # an entry point may be a callable returning classes
    assert backend_origin("alpha") == backend_origin("beta") == "fake-hwoptim-plugin 1.0"
    assert backend_origin("npu") == "built-in"


def test_a_broken_plugin_warns_by_name_and_breaks_nothing(plugin_dist: None) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        backends = list_backends()
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "libvendor.so" in m and "skipped" in m for m in messages)
    assert any("'clash'" in m and "already registered" in m for m in messages)
    assert len(messages) == 2  # one warning per failed plugin
    assert {"alpha", "beta", "cpu", "cuda", "npu"} <= set(backends)
    assert backends["cpu"] is CpuBackend  # the clash did not replace the built-in
    assert [name for name, _ in plugin_errors()] == ["broken", "clash"]
    assert get_backend("cpu").name == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plugins load once: no second round of warnings
        list_backends()


def test_override_replaces_a_built_in_on_purpose(fresh_registry: None) -> None:
    class TunedCuda(CudaBackend):
        pass

    with pytest.raises(ValueError, match=r"'cuda' is already registered.*override=True"):
        register_backend(TunedCuda)
    register_backend(TunedCuda, override=True)
    assert list_backends()["cuda"] is TunedCuda
    assert backend_origin("cuda") == "user"
    assert unregister_backend("cuda") is TunedCuda
    assert "cuda" not in list_backends()


def test_register_backend_checks_what_it_is_given(fresh_registry: None) -> None:
    with pytest.raises(TypeError, match="Backend subclass"):
        register_backend(object)  # type: ignore[arg-type]

    class Nameless(Backend):
        pass

    with pytest.raises(ValueError, match="must set both 'name' and 'device_type'"):
        register_backend(Nameless)


# -- plugins that misbehave are reported by name and left out ---------------------------------

def test_a_plugin_whose_priority_is_no_number_is_reported_by_name_and_left_out(
    misbehaving_plugins: None,
) -> None:
    with pytest.warns(RuntimeWarning, match=r"plugin 'wordy'.*WordyPriority\.priority must be a number.*'high'"):
        backends = list_backends()
    assert "wordy" not in backends and {"fine", "raising", "cpu"} <= set(backends)
    assert ("wordy", "TypeError: WordyPriority.priority must be a number (higher is tried first "
            "by device='auto'); got 'high'") in plugin_errors()


def test_a_plugin_whose_is_available_raises_is_left_out_of_auto(misbehaving_plugins: None) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        assert get_backend("auto").name == "cpu"
    messages = [str(w.message) for w in caught]
    assert any("'raising'" in m and "is_available() raised" in m and "driver handshake" in m
               for m in messages)
    assert any("'exiting'" in m and "sys.exit(3)" in m for m in messages)
    assert any("'unbuildable'" in m and "__init__() raised" in m and "no vendor context" in m
               for m in messages)
    errors = dict(plugin_errors())
    assert "OSError: driver handshake failed" in errors["raising"]
    assert "sys.exit(3)" in errors["exiting"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not at every lookup
        assert get_backend("auto").name == "cpu"
        with pytest.raises(RuntimeError, match=r"'raising' backend is not available: its is_available\(\) raised"):
            get_backend("raising")


def test_a_vendor_import_that_calls_sys_exit_makes_its_backend_unavailable(
    misbehaving_plugins: None,
) -> None:
    with pytest.warns(RuntimeWarning):
        list_backends()
    message = r"fake_exiting_vendor is installed but failed to import: SystemExit: no driver found"
    with pytest.raises(RuntimeError, match=message):
        get_backend("exitvendor")


# -- names: lower case, looked up case-insensitively ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("MyDev", ValueError, r"MyDev.*has capitals.*use 'mydev'"),
        ("my:dev", ValueError, "cannot be looked up"),
        ("my dev", ValueError, "cannot be looked up"),
        ("auto", ValueError, "cannot be looked up.*not 'auto'"),
        (3, TypeError, "must be a non-empty str"),
    ],
)
def test_a_name_get_backend_could_not_find_is_refused(
    fresh_registry: None, name: object, error: type[Exception], match: str
) -> None:
    cls = type("Odd", (Backend,), {"name": name, "device_type": "odd"})
    with pytest.raises(error, match=match):
        register_backend(cls)
    assert "odd" not in {c.device_type for c in list_backends().values()}


def test_every_lookup_ignores_case(fresh_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    class MyDev(CpuBackend):
        name = "mydev"

    register_backend(MyDev)
    assert type(get_backend("MyDev")) is MyDev and type(get_backend("MYDEV:0")) is MyDev
    assert backend_origin("MyDev") == "user"
    monkeypatch.setenv(registry.ENV_VAR, "MyDev")
    assert type(get_backend("auto")) is MyDev
    with mock_backend("NPU") as mock:
        assert mock.name == "npu" and get_backend("auto").name == "npu"
    assert unregister_backend("MyDev") is MyDev
    assert "mydev" not in list_backends()


# -- the seam for test tools ---------------------------------------------------------------


class _MetaBackend(Backend):
    """An always available backend whose tensors would go to the meta device."""

    name = "metadev"
    device_type = "meta"
    priority = 1000

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0


class _Override:
    """An Override that makes "auto" resolve cpu and keeps metadev's tensors on the CPU."""

    def auto_backend(self) -> str | None:
        return "cpu"

    def keeps_on_cpu(self, name: str) -> bool:
        return name == "metadev"


def test_an_override_chooses_auto_and_the_placement_until_it_is_cleared() -> None:
    register_backend(_MetaBackend)
    try:
        assert get_backend("auto").name == "metadev"
        assert get_backend("metadev").device().type == "meta"
        registry._set_override(_Override())
        try:
            assert get_backend("auto").name == "cpu"
            assert get_backend("metadev").device() == torch.device("cpu")
        finally:
            registry._set_override(None)
        assert get_backend("auto").name == "metadev"
        assert get_backend("metadev").device().type == "meta"
    finally:
        unregister_backend("metadev")


def _private_registry_names_used(path: Path) -> set[str]:
    """The registry's private names that the module at ``path`` reads."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "registry":
            if node.attr.startswith("_"):
                used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module == "hwoptim.backends.registry":
            used.update(alias.name for alias in node.names if alias.name.startswith("_"))
    return used


def test_only_the_mocks_reach_into_the_registry_and_only_through_its_seam() -> None:
    package = Path(hwoptim.__file__).parent
    users = {
        str(path.relative_to(package)): names
        for path in sorted(package.rglob("*.py"))
        if path.name != "registry.py" and (names := _private_registry_names_used(path))
    }
    # generic.py installs the registry's fallback for unclaimed devices (the registry cannot
    # import it: generic imports the registry); nothing else but the mocks' seam reaches in
    assert users == {"testing/mock.py": {"_set_override"}, "backends/generic.py": {"_generic_factory"}}


# -- the surface: wrong types, wrong values, warnings at the user's line ----------------------


def test_a_name_that_is_no_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unregister_backend takes a backend name such as 'npu'; got int"):
        unregister_backend(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backend_origin takes a backend name such as 'npu'; got NoneType"):
        backend_origin(None)  # type: ignore[arg-type]


def test_a_nan_priority_is_a_value_error(fresh_registry: None) -> None:
    class NanPriority(CpuBackend):
        name = "nanprio"
        priority = float("nan")

    with pytest.raises(ValueError, match=r"NanPriority\.priority is NaN"):
        register_backend(NanPriority)


def test_plugin_warnings_point_at_the_users_line(misbehaving_plugins: None) -> None:
    with pytest.warns(RuntimeWarning) as caught:
        hwoptim.AmpOptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), device="auto")
    assert len(caught) >= 3  # the failed load, the raising is_available, the failing __init__
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}


# -- two backends claiming one device type ------------------------------------------------------


def _claimants(first: int, second: int) -> tuple[type[Backend], type[Backend]]:
    """Two available backends, registered in this order, both for torch's "ipu" device type
    (a type torch knows and no built-in claims), with these priorities."""
    made = []
    for name, priority in (("ipu-a", first), ("ipu-b", second)):
        cls = type(
            name.replace("-", "_"), (Backend,),
            {"name": name, "device_type": "ipu", "priority": priority,
             "is_available": lambda self: True, "device_count": lambda self: 1},
        )
        register_backend(cls)
        made.append(cls)
    return made[0], made[1]


@pytest.mark.parametrize(("first", "second"), [(1, 2), (2, 1)])
def test_of_two_backends_for_one_device_type_the_higher_priority_is_taken(
    fresh_registry: None, monkeypatch: pytest.MonkeyPatch, first: int, second: int
) -> None:
    """Whichever was registered first: a torch.device, the device type's name and "auto"
    (by the priority order, and as torch's current accelerator) all take priority 2."""
    a, b = _claimants(first, second)
    higher = a if first > second else b
    assert type(get_backend(torch.device("ipu"))) is higher
    assert type(get_backend(torch.device("ipu", 0))) is higher
    assert type(get_backend("ipu")) is higher
    assert type(get_backend("auto")) is higher  # no accelerator on this machine: by priority
    # torch's current accelerator comes first, before a backend of higher priority
    ahead = type("Ahead", (Backend,), {"name": "ahead", "device_type": "xla", "priority": 50,
                                       "is_available": lambda self: True})
    register_backend(ahead)
    assert type(get_backend("auto")) is ahead
    monkeypatch.setattr(registry, "current_accelerator", lambda: "ipu")
    assert type(get_backend("auto")) is higher


# -- what mutation testing found unchecked (docs/contributing.md) --------------------------------


def test_a_backend_needs_a_device_type_as_well_as_a_name(fresh_registry: None) -> None:
    for attrs in ({"name": "typeless"}, {"device_type": "cuda"}):
        with pytest.raises(ValueError, match="must set both 'name' and 'device_type'"):
            register_backend(type("Half", (Backend,), attrs))
    assert "typeless" not in list_backends()


def test_unregistering_an_unknown_name_lists_the_registered_ones(fresh_registry: None) -> None:
    with pytest.raises(ValueError, match=r"^no backend named 'nope'; registered: 'cpu', 'cuda', "):
        unregister_backend("nope")
    assert backend_origin("nope") == "unknown"
    assert unregister_backend("CPU") is CpuBackend and backend_origin("cpu") == "unknown"


def test_a_raising_check_of_a_backend_never_registered_is_reported_with_an_unknown_origin(
    fresh_registry: None,
) -> None:
    class Stray(CpuBackend):
        name = "stray"

        def is_available(self) -> bool:
            raise RuntimeError("boom")

    with pytest.warns(RuntimeWarning) as caught:
        assert registry.is_available(Stray()) is False
    assert [str(w.message) for w in caught] == [
        "hwoptim backend 'stray' (unknown): is_available() raised and the backend is left out: "
        "RuntimeError: boom"
    ]
    assert ("stray", "is_available() raised RuntimeError: boom") in plugin_errors()
