"""compile_step: the update through torch.compile, equal to the eager one, compiled once.

Compiling is slow on a busy CI machine, so most tests compile with ``backend="eager"``:
dynamo traces hwoptim's update exactly as for inductor (the same guards, recompiles and
graph breaks), and only the code generation is skipped. One test runs the default
inductor backend on a tiny model, for the numbers of real generated code.
"""

from __future__ import annotations

import copy
import io
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import hwoptim
from hwoptim._guard import FUSED
from hwoptim.compile import parse_compile_step

EAGER_BACKEND = {"backend": "eager"}
STEPS = 6  # micro-batches: 3 updates at accumulation 2
INF_AT = 2  # this micro-batch gets an inf input: the second update is skipped


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test starts with no compiled code and zeroed counters (recompiles are counted
    per function, across wrappers: one test's compiles must not count in the next).

    Where an earlier test imported mmengine, every wrapper logs each update's norm to
    mmengine's current MessageHub (hwoptim.mmengine), a process-wide object: its buffer
    folds its queue every 256 updates, and that fold, traced inside a user's compiled
    train step, is one more graph. How full the buffer is depends on which tests ran
    before, so each test logs to a fresh hub of its own.
    """
    if "mmengine" in sys.modules:
        from mmengine.logging import MessageHub

        MessageHub.get_instance(f"test_compile-{uuid.uuid4().hex}")  # now the current one
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class Sign(torch.optim.Optimizer):
    """A user-defined optimizer (signSGD with momentum): no fused kernel, plain Python."""

    def __init__(self, params: Any, lr: float = 0.01, beta: float = 0.9) -> None:
        super().__init__(params, dict(lr=lr, beta=beta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                buf = state["buf"]
                buf.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(buf.sign(), alpha=-group["lr"])


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adamw-foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True),
    "adamw-for-loop": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False),
    "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True),
    "user-defined": lambda m: Sign(m.parameters()),
}
NORM = {"max_norm": 0.5}
VALUE = {"type": "value", "clip_value": 0.05}


def _wrapper(
    model: nn.Module, optimizer: str, compile_step: Any, *, clip: Any = NORM,
    dtype: str | None = None, acc: int = 2,
) -> hwoptim.OptimWrapper:
    opt = OPTIMIZERS[optimizer](model)
    if dtype is None:
        return hwoptim.OptimWrapper(opt, acc, clip, compile_step=compile_step)
    return hwoptim.AmpOptimWrapper(
        opt, device="cpu", dtype=dtype, accumulative_counts=acc, clip_grad=clip,
        compile_step=compile_step,
    )


def _batches(n: int = STEPS, inf_at: int | None = INF_AT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(3, 4, generator=generator)
        if i == inf_at:
            x[0, 0] = float("inf")
        out.append((x, torch.randn(3, 2, generator=generator)))
    return out


def _train(wrapper: hwoptim.OptimWrapper, model: nn.Module, batches: list[Any]) -> None:
    wrapper.initialize_count_status(model, 0, len(batches))
    for x, y in batches:
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x), y)
        wrapper.update_params(loss)


def _run(optimizer: str, compile_step: Any, **kwargs: Any) -> tuple[nn.Module, hwoptim.OptimWrapper]:
    model = _model()
    wrapper = _wrapper(model, optimizer, compile_step, **kwargs)
    _train(wrapper, model, _batches())
    return model, wrapper


def _assert_close(eager: tuple[nn.Module, Any], compiled: tuple[nn.Module, Any]) -> None:
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.cat([p.flatten() for p in compiled[0].parameters()])).all()
    torch.testing.assert_close(compiled[1].last_grad_norm, eager[1].last_grad_norm)
    for counter in ("skipped_steps", "zeroed_steps"):
        assert getattr(eager[1], counter) is not None
        assert getattr(compiled[1], counter).item() == getattr(eager[1], counter).item(), counter


def _bad_updates(wrapper: hwoptim.OptimWrapper) -> float:
    """Updates skipped or stepped with zeroed gradients."""
    return wrapper.skipped_steps.item() + wrapper.zeroed_steps.item()


# -- the option --------------------------------------------------------------------------


def test_parse_compile_step_accepts_bools_and_torch_compile_kwargs() -> None:
    assert parse_compile_step(False) is None
    assert parse_compile_step(True) == {}
    given = {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": False}
    assert parse_compile_step(given) == given
    assert parse_compile_step(given) is not given  # a copy: the config is never changed
    assert parse_compile_step({"backend": lambda gm, inputs: gm}) is not None


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("yes", TypeError, "compile_step must be True, False or a dict"),
        (1, TypeError, "compile_step must be True, False or a dict"),
        ({"mdoe": "default"}, ValueError, "does not take 'mdoe'; torch.compile takes"),
        ({"model": None}, ValueError, "does not take 'model'"),
        ({"fullgraph": "yes"}, TypeError, "'fullgraph' must be True or False"),
        ({"options": 3}, TypeError, "'options' must be a dict"),
        ({"mode": "fastest"}, ValueError, "mode 'fastest' is not one of"),
        ({"backend": "nope"}, ValueError, "backend 'nope' is not a torch.compile backend"),
    ],
)
def test_a_bad_compile_step_fails_when_the_wrapper_is_made(value: Any, error: type, match: str) -> None:
    model = _model()
    with pytest.raises(error, match=match):
        hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), compile_step=value)
    with pytest.raises(error, match=match):
        hwoptim.AmpOptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", compile_step=value
        )


def test_repr_shows_compile_step() -> None:
    model = _model()
    assert "compile_step" not in repr(hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    wrapper = hwoptim.OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), compile_step=True)
    assert "  compile_step=True," in repr(wrapper).splitlines()  # the whole line: nothing after it
    wrapper = hwoptim.OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), compile_step={"mode": "max-autotune"}
    )
    assert "  compile_step={'mode': 'max-autotune'}," in repr(wrapper)


def test_build_optim_wrapper_passes_compile_step_through() -> None:
    model = _model()
    cfg = dict(
        type="AmpOptimWrapper", optimizer=dict(type="SGD", lr=0.1), device="cpu",
        dtype="bfloat16", clip_grad=dict(max_norm=1.0), compile_step=EAGER_BACKEND,
    )
    wrapper = hwoptim.build_optim_wrapper(model, cfg)
    assert wrapper._guard.compiled is not None
    with pytest.raises(ValueError, match="does not take 'mdoe'"):
        hwoptim.build_optim_wrapper(model, dict(optimizer=dict(type="SGD", lr=0.1),
                                                compile_step={"mdoe": "default"}))


# -- the same results as eager -------------------------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compiled_update_equals_eager_with_norm_clipping_and_an_inf(optimizer: str) -> None:
    eager = _run(optimizer, False)
    compiled = _run(optimizer, EAGER_BACKEND)
    _assert_close(eager, compiled)
    assert _bad_updates(compiled[1]) == 1  # the inf was caught, and counted once
    assert compiled[1]._guard.compiled.compiled


@pytest.mark.parametrize("optimizer", ["adamw-foreach", "user-defined"])
def test_compiled_update_equals_eager_with_exact_skip(optimizer: str) -> None:
    """exact_skip's copy and where() run inside the compiled update: a real skip, and the
    parameters and state equal the eager exact skip's."""
    def run(compile_step: Any) -> tuple[nn.Module, hwoptim.OptimWrapper]:
        model = _model()
        opt = OPTIMIZERS[optimizer](model)
        wrapper = hwoptim.OptimWrapper(opt, 2, NORM, exact_skip=True, compile_step=compile_step)
        _train(wrapper, model, _batches())
        return model, wrapper

    eager, compiled = run(False), run(EAGER_BACKEND)
    _assert_close(eager, compiled)
    assert compiled[1].skipped_steps.item() == 1 and compiled[1].zeroed_steps.item() == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_compiled_update_equals_eager_with_value_clipping(optimizer: str) -> None:
    _assert_close(_run(optimizer, False, clip=VALUE), _run(optimizer, EAGER_BACKEND, clip=VALUE))


@pytest.mark.parametrize(
    ("dtype", "optimizer"),
    [("bfloat16", "adamw-foreach"), ("float16", "adamw-foreach"), ("float16", "adamw-fused")],
)
def test_compiled_update_equals_eager_under_autocast(dtype: str, optimizer: str) -> None:
    eager = _run(optimizer, False, dtype=dtype)
    compiled = _run(optimizer, EAGER_BACKEND, dtype=dtype)
    _assert_close(eager, compiled)
    if dtype == "float16":  # the scaler's state moved the same way
        assert compiled[1].loss_scale.item() == eager[1].loss_scale.item()


@pytest.mark.filterwarnings("ignore:.*had no items")
@pytest.mark.parametrize(
    ("optimizer", "dtype", "clip"),
    [("adamw-foreach", None, NORM), ("adamw-fused", None, NORM), ("sgd", None, None),
     ("adamw-foreach", "float16", NORM)],
)
def test_compiled_update_equals_eager_with_num_items(optimizer: str, dtype: Any, clip: Any) -> None:
    """The window's item count divides the gradients before the compiled update; a
    window without items is skipped and counted, as in eager mode."""
    counts = [3, 2, 0, 0, 1, 3]  # the second window (micro-batches 2 and 3) has no item

    def run(compile_step: Any) -> tuple[nn.Module, hwoptim.OptimWrapper]:
        model = _model()
        wrapper = _wrapper(model, optimizer, compile_step, clip=clip, dtype=dtype)
        wrapper.initialize_count_status(model, 0, len(counts))
        for (x, y), n in zip(_batches(inf_at=None), counts):
            with wrapper.optim_context(model):
                loss = nn.functional.mse_loss(model(x)[:n], y[:n], reduction="sum")
            wrapper.update_params(loss, num_items=n)
        return model, wrapper

    eager, compiled = run(False), run(EAGER_BACKEND)
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert compiled[1].skipped_steps.item() == eager[1].skipped_steps.item()
    assert compiled[1].zeroed_steps.item() == eager[1].zeroed_steps.item()
    assert _bad_updates(compiled[1]) >= 1
    torch.testing.assert_close(compiled[1].last_loss, eager[1].last_loss)


def test_without_clipping_or_scaler_only_the_step_is_compiled_and_nothing_is_counted() -> None:
    eager = _run("adamw-foreach", False, clip=None)
    compiled = _run("adamw-foreach", EAGER_BACKEND, clip=None)
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        assert not torch.isfinite(p).all()  # no guard without a check: inf reached the weights
        torch.testing.assert_close(q, p, equal_nan=True)
    assert compiled[1].skipped_steps is None and compiled[1].last_grad_norm is None


@pytest.mark.parametrize(("optimizer", "counter"), [("sgd", "zeroed_steps"), ("adamw-fused", "skipped_steps")])
def test_the_counts_read_are_snapshots_not_live_views(optimizer: str, counter: str) -> None:
    _, wrapper = _run(optimizer, EAGER_BACKEND)
    seen = getattr(wrapper, counter)
    assert seen is not None and seen.item() == 1
    for p in wrapper.optimizer.param_groups[0]["params"]:
        p.grad = torch.full_like(p, float("nan"))
    wrapper.step()
    assert seen.item() == 1 and getattr(wrapper, counter).item() == 2


def test_a_checkpoint_resumes_into_a_compiled_wrapper_as_into_an_eager_one() -> None:
    def resumed(compile_step: Any) -> nn.Module:
        model, wrapper = _run("adamw-foreach", compile_step)
        state = wrapper.state_dict()
        torch.manual_seed(1)
        fresh = _model()
        fresh.load_state_dict(model.state_dict())
        again = _wrapper(fresh, "adamw-foreach", compile_step)
        again.load_state_dict(state)
        _train(again, fresh, _batches(4, inf_at=None))
        return fresh

    for p, q in zip(resumed(False).parameters(), resumed(EAGER_BACKEND).parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_a_deep_copy_compiles_its_own_update_and_steps_its_own_parameters() -> None:
    model, wrapper = _run("sgd", EAGER_BACKEND)
    twin = copy.deepcopy(wrapper)
    twin_params = twin.optimizer.param_groups[0]["params"]
    before = [p.detach().clone() for p in model.parameters()]
    for p in twin_params:
        p.grad = torch.ones_like(p)
    twin.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not all(torch.equal(b, p) for b, p in zip(before, twin_params))


def test_a_deep_copy_watches_its_own_optimizers_steps() -> None:
    """compile_step notes whether the optimizer stepped (so that a failure after the step
    does not step twice): a copy must note its own optimizer's steps, not share the flag
    of the original, whose hook the copied optimizer still carries."""
    _, wrapper = _run("sgd", EAGER_BACKEND)
    twin = copy.deepcopy(wrapper)
    twin_params = twin.optimizer.param_groups[0]["params"]
    for p in twin_params:
        p.grad = torch.ones_like(p)
    twin.step()
    assert twin._guard._step_seen == [True]
    assert twin._guard._step_seen is not wrapper._guard._step_seen


def test_a_saved_and_loaded_wrapper_compiles_again_and_trains_its_own_model() -> None:
    """torch.save/torch.load of (model, wrapper), an LR scheduler on the optimizer: the copy
    compiles its own update, for its own optimizer, and leaves the original alone."""
    model = _model()
    wrapper = _wrapper(model, "adamw-foreach", EAGER_BACKEND, acc=1)
    torch.optim.lr_scheduler.LambdaLR(wrapper.optimizer, lambda i: 1 / (i + 1))
    _train(wrapper, model, _batches(3, inf_at=None))
    buffer = io.BytesIO()
    torch.save((model, wrapper), buffer)
    buffer.seek(0)
    model2, wrapper2 = torch.load(buffer, weights_only=False)
    before = [p.detach().clone() for p in model.parameters()]
    _train(wrapper2, model2, _batches(3, inf_at=None))
    assert wrapper2._guard.compiled.compiled and wrapper2._guard._compiled_step.__self__ is wrapper2.optimizer
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not all(torch.equal(b, p) for b, p in zip(before, model2.parameters()))


# -- compiled once ---------------------------------------------------------------------------


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.skipif(
    torch.__version__ < (2, 6),  # type: ignore[operator]
    reason="torch < 2.6 compiles a float it meets as a constant: each new LR recompiles",
)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw-for-loop"])
def test_no_recompiles_after_the_first_update_with_an_lr_scheduler(optimizer: str) -> None:
    """An LR that changes every update: the for-loop optimizers (torch's choice on a CPU)
    take it as a value, not a constant. (A foreach or fused kernel takes it as a constant,
    and inductor then compiles once per value: docs/compile.md.)"""
    model = _model()
    wrapper = _wrapper(model, optimizer, EAGER_BACKEND, acc=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(wrapper.optimizer, lambda i: 1 / (i + 1))
    batches = _batches(12, inf_at=5)

    def train(part: list[Any]) -> None:
        for x, y in part:
            with wrapper.optim_context(model):
                loss = nn.functional.mse_loss(model(x), y)
            wrapper.update_params(loss)
            scheduler.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler's "step() before optimizer.step()"
        train(batches[:3])
        graphs = _graphs()
        assert graphs > 0
        train(batches[3:])
    assert _graphs() == graphs, "the update was compiled again after the first updates"
    assert _bad_updates(wrapper) == 1
    assert wrapper.get_lr()["lr"][0] == pytest.approx(wrapper.defaults["lr"] / 13)


@pytest.mark.parametrize(
    ("optimizer", "clip", "exact_skip"),
    [("adamw-foreach", NORM, False), ("sgd", VALUE, False), ("adamw-fused", NORM, False),
     ("adamw-for-loop", NORM, True)],
)
def test_no_graph_break_is_in_hwoptims_code(optimizer: str, clip: Any, exact_skip: bool) -> None:
    """torch.optim breaks the graph around every step on purpose (so AOT sees an
    inference graph), and older torch in some of its own helpers; none of the breaks may
    be in hwoptim's code: the innermost frame of each is torch's."""
    model = _model()
    opt = OPTIMIZERS[optimizer](model)
    wrapper = hwoptim.OptimWrapper(opt, clip_grad=clip, exact_skip=exact_skip)
    x, y = _batches(1, inf_at=None)[0]
    nn.functional.mse_loss(model(x), y).backward()
    params = wrapper._binding.params()
    guard = wrapper._guard
    guard._compiled_step = opt.step
    wrapper._skips.materialize(params[0].device)
    found_inf = guard._found_buffer(params)
    if guard.policy == FUSED:
        opt.found_inf = found_inf  # what _run_compiled sets for a fused optimizer
    explained = torch._dynamo.explain(guard._compiled_body)(params, None, None, {})
    package = Path(hwoptim.__file__).parent
    assert explained.break_reasons, "expected torch.optim's deliberate graph breaks"
    for reason in explained.break_reasons:
        innermost = Path(reason.user_stack[-1].filename)
        assert package not in innermost.parents, f"{reason.reason} at {innermost}"


def _counting_backend() -> tuple[Callable[..., Any], list[int]]:
    """A backend running each graph as given, counting the calls of the compiled graphs."""
    calls = [0]

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        def run(*args: Any) -> Any:
            calls[0] += 1
            return gm.forward(*args)

        return run

    return backend, calls


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_every_update_runs_the_compiled_graphs_and_says_so(optimizer: str) -> None:
    """Not only the first update: each one calls the compiled graphs, and the wrapper's
    repr and ``compiled`` say compiled."""
    backend, calls = _counting_backend()
    model = _model()
    wrapper = _wrapper(model, optimizer, {"backend": backend}, acc=1)
    wrapper.initialize_count_status(model, 0, 5)
    per_update = []
    for x, y in _batches(5, inf_at=2):
        before = calls[0]
        with wrapper.optim_context(model):
            loss = nn.functional.mse_loss(model(x), y)
        wrapper.update_params(loss)
        per_update.append(calls[0] - before)
    # the first update may run a graph more (mmengine's logging, when a test imported it,
    # makes its buffer then); from the second on, each runs the same graphs
    assert per_update[0] >= per_update[1] > 0 and per_update[1:] == [per_update[1]] * 4, per_update
    assert wrapper._guard.compiled.compiled and "uncompiled" not in repr(wrapper)
    assert _bad_updates(wrapper) == 1


def test_after_a_fallback_no_compiled_graph_runs_and_the_repr_says_uncompiled() -> None:
    backend, calls = _counting_backend()
    failing = _fails_on_the_second_graph()

    def first_graph_counted(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        failing(gm, inputs)  # raises on the second graph
        return backend(gm, inputs)

    model = _model()
    wrapper = _wrapper(model, "sgd", {"backend": first_graph_counted}, acc=1)
    wrapper.initialize_count_status(model, 0, 4)
    seen = []
    with pytest.warns(RuntimeWarning, match="could not compile the update"):
        for x, y in _batches(4, inf_at=None):
            with wrapper.optim_context(model):
                loss = nn.functional.mse_loss(model(x), y)
            wrapper.update_params(loss)
            seen.append(calls[0])
    assert not wrapper._guard.compiled.compiled
    assert seen[0] == 1 and seen == [1] * 4  # the first graph once, then uncompiled
    assert "compile_step={'backend': " in repr(wrapper) and "# uncompiled: " in repr(wrapper)


# -- a user's own compiled code ----------------------------------------------------------------


def test_a_user_compiled_train_step_calling_update_params_does_not_recompile() -> None:
    model = _model()
    wrapper = hwoptim.OptimWrapper(
        torch.optim.AdamW(model.parameters(), lr=1e-2), clip_grad=NORM
    )

    @torch.compile(backend="eager")
    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        wrapper.update_params(nn.functional.mse_loss(model(x), y))

    batches = _batches(10, inf_at=6)
    for x, y in batches[:3]:
        train_step(x, y)
    graphs = _graphs()
    for x, y in batches[3:]:
        train_step(x, y)
    assert _graphs() == graphs
    assert _bad_updates(wrapper) == 1


@pytest.mark.parametrize("compile_step", [False, EAGER_BACKEND])
def test_a_user_compiled_model_meets_no_recompiles_from_hwoptim(compile_step: Any) -> None:
    model = _model()
    compiled_model = torch.compile(model, backend="eager")
    wrapper = _wrapper(model, "adamw-foreach", compile_step, dtype="bfloat16")
    batches = _batches(12, inf_at=None)
    _train(wrapper, compiled_model, batches[:4])
    graphs = _graphs()
    _train(wrapper, compiled_model, batches[4:])
    assert _graphs() == graphs


# -- when torch.compile does not work here ---------------------------------------------------


def _broken_backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
    raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cpp_builder.py")


def _fails_on_the_second_graph() -> Callable[..., Any]:
    """A backend compiling the first graph (clip and guard) and failing on the next (the
    optimizer's step): the update is then half done when the compiler gives up."""
    seen = []

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        seen.append(gm)
        if len(seen) > 1:
            raise RuntimeError("internal compiler error")
        return gm.forward

    return backend


@pytest.mark.parametrize("backend", [_broken_backend, _fails_on_the_second_graph()])
def test_a_compiler_failure_falls_back_to_eager_with_one_warning(backend: Any) -> None:
    eager = _run("adamw-foreach", False)
    with pytest.warns(RuntimeWarning, match="could not compile the update") as caught:
        compiled = _run("adamw-foreach", {"backend": backend})
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__  # the user's line (here: _run's update_params)
    message = str(ours[0].message)
    assert "runs uncompiled" in message
    assert "C++ compiler" in message or "internal compiler error" in message  # the cause
    assert not compiled[1]._guard.compiled.compiled
    _assert_close(eager, compiled)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_a_compiler_failure_after_the_optimizer_step_does_not_step_twice(optimizer: str) -> None:
    """A step post-hook with a graph break, and a backend that fails on the graphs compiled
    once the step has run: the update is finished without running the step again."""
    def run(compile_step: Any) -> tuple[nn.Module, hwoptim.OptimWrapper, list[int]]:
        model = _model()
        wrapper = _wrapper(model, optimizer, compile_step)
        steps: list[int] = []

        def hook(opt: Any, args: Any, kwargs: Any) -> None:
            steps.append(1)
            torch._dynamo.graph_break()

        wrapper.optimizer.register_step_post_hook(hook)
        box.append(steps)
        _train(wrapper, model, _batches())
        return model, wrapper, steps

    box: list[list[int]] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        if box[-1]:
            raise RuntimeError("late compiler error")
        return gm.forward

    eager = run(False)
    with pytest.warns(RuntimeWarning, match="late compiler error"):
        compiled = run({"backend": backend})
    assert not compiled[1]._guard.compiled.compiled
    assert len(compiled[2]) == len(eager[2]) == STEPS // 2  # one step per update
    _assert_close(eager[:2], compiled[:2])
    want, got = _state_tensors(eager[1]), _state_tensors(compiled[1])
    assert len(got) == len(want) > 0
    for a, b in zip(want, got):  # momentum / moments and step counts advanced once per update
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _state_tensors(wrapper: hwoptim.OptimWrapper) -> list[torch.Tensor]:
    """The optimizer's state tensors (momentum, moments, step counts), in order."""
    state = wrapper.optimizer.state_dict()["state"]
    return [v for i in sorted(state) for _, v in sorted(state[i].items()) if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-foreach", "adamw-fused"])
def test_a_compile_failing_in_the_first_update_is_undone_before_it_runs_eagerly(optimizer: str) -> None:
    """The compiler gives up on the first update after its clip and guard already ran (the
    first graph), before the optimizer's step (the second graph): the eager re-run must
    start from the gradients and counts as they were, or it clips twice and guards an
    update the first pass already zeroed. The first window holds the inf; the second's
    norm is above max_norm. Everything equals the eager run exactly."""
    def run(compile_step: Any) -> tuple[nn.Module, hwoptim.OptimWrapper, list[torch.Tensor]]:
        model = _model()
        wrapper = _wrapper(model, optimizer, compile_step)
        batches = _batches(STEPS, inf_at=1)
        wrapper.initialize_count_status(model, 0, len(batches))
        norms = []
        for x, y in batches:
            with wrapper.optim_context(model):
                loss = nn.functional.mse_loss(model(x), y) * 10
            wrapper.update_params(loss)
            if wrapper.inner_count % 2 == 0:  # an update ran
                norms.append(wrapper.last_grad_norm.clone())
        return model, wrapper, norms

    eager = run(False)
    with pytest.warns(RuntimeWarning, match="could not compile the update"):
        compiled = run({"backend": _fails_on_the_second_graph()})
    assert not compiled[1]._guard.compiled.compiled
    assert not torch.isfinite(eager[2][0]) and eager[2][1] > NORM["max_norm"]
    for got, want in zip(compiled[2], eager[2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for counter in ("skipped_steps", "zeroed_steps"):
        assert getattr(compiled[1], counter).item() == getattr(eager[1], counter).item(), counter
    assert _bad_updates(compiled[1]) == 1
    for p, q in zip(eager[0].parameters(), compiled[0].parameters()):
        assert torch.equal(q, p)


def test_an_error_of_the_update_itself_is_raised_and_compiling_is_not_given_up() -> None:
    model = _model()
    wrapper = _wrapper(model, "adamw-foreach", EAGER_BACKEND, acc=1)
    x, y = _batches(1, inf_at=None)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        with pytest.raises(TypeError, match="nope"):
            wrapper.update_params(nn.functional.mse_loss(model(x), y), step_kwargs={"nope": 1})
        wrapper.update_params(nn.functional.mse_loss(model(x), y))
    assert wrapper._guard.compiled.compiled and wrapper._guard.compiled.ready


def test_a_torch_without_torch_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not supported on Python 3.15+")

    eager = _run("sgd", False, dtype="float16")
    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.warns(RuntimeWarning, match="not supported on Python 3.15"):
        compiled = _run("sgd", True, dtype="float16")
    _assert_close(eager, compiled)


# -- the real compiler -----------------------------------------------------------------------


@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
    reason="inductor's CPU backend needs a C++ compiler (the fallback is tested above)",
)
def test_inductor_compiles_the_update_once_and_matches_eager() -> None:
    """The default backend (C++ code for the CPU): compiled once, equal to float tolerance."""
    eager = _run("adamw-foreach", False)
    compiled = _run("adamw-foreach", True)
    assert compiled[1]._guard.compiled.compiled, compiled[1]._guard.compiled.reason
    _assert_close(eager, compiled)


def test_mmengine_logging_sees_each_compiled_update_and_compiles_nothing_more() -> None:
    """Under mmengine (hwoptim.mmengine), a step post-hook queues the grad norm for the
    MessageHub: it sees each update's norm (set before the step, as eagerly), and pushing
    it compiles nothing again."""
    from mmengine.logging import MessageHub

    def logged(compile_step: Any, name: str) -> list[float]:
        hub = MessageHub.get_instance(name)  # the current instance from now on
        model = _model()
        wrapper = _wrapper(model, "adamw-foreach", compile_step, acc=1)
        _train(wrapper, model, _batches(8, inf_at=None)[:3])
        graphs = _graphs()
        _train(wrapper, model, _batches(8, inf_at=None)[3:])
        assert _graphs() == graphs
        return [float(v) for v in hub.get_scalar("train/grad_norm").data[0]]

    eager = logged(False, "test_compile_eager")
    compiled = logged(EAGER_BACKEND, "test_compile_compiled")
    assert len(compiled) == len(eager) == 8
    assert compiled == pytest.approx(eager, rel=1e-5)


# -- what mutation testing found unchecked (docs/contributing.md) --------------------------------


def test_the_fallback_names_the_compilers_error_and_its_root_cause() -> None:
    from hwoptim.compile import _describe

    with pytest.warns(RuntimeWarning, match="could not compile the update"):
        _, wrapper = _run("sgd", {"backend": _fails_on_the_second_graph()})
    reason = wrapper._guard.compiled.reason
    assert reason is not None and reason.endswith(", caused by RuntimeError: internal compiler error")
    assert reason.startswith("BackendCompilerFailed, caused by ")  # the compiler's own error first
    assert _describe(RuntimeError("first line\nsecond")) == "RuntimeError: first line"
    assert _describe(RuntimeError()) == "RuntimeError"


def test_a_copy_of_a_fallen_back_wrapper_stays_uncompiled_and_says_why() -> None:
    with pytest.warns(RuntimeWarning, match="could not compile the update"):
        _, wrapper = _run("sgd", {"backend": _broken_backend})
    twin = copy.deepcopy(wrapper)
    assert twin._guard.compiled.reason == wrapper._guard.compiled.reason is not None
    assert twin._guard.compiled.owner == "OptimWrapper" and not twin._guard.compiled.compiled
    assert "# uncompiled: " in repr(twin)
