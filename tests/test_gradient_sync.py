"""hwoptim.backends.base.skip_gradient_sync: which modules a skip switches, for every kind
of model, decided once per model. Stand-ins record the calls; tests/test_distributed.py
proves the same against real DDP and FSDP2 collectives."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
from helpers import run_micro_batches
from torch import nn

from hwoptim import OptimWrapper, get_backend, list_backends
from hwoptim.backends.base import skip_gradient_sync


class FSDP2Like(nn.Linear):
    """An FSDP2 module as far as hwoptim can tell: ``set_requires_gradient_sync``."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.sync = True
        self.calls: list[tuple[bool, bool]] = []

    def set_requires_gradient_sync(self, flag: bool, *, recurse: bool = True) -> None:
        self.calls.append((flag, recurse))
        self.sync = flag


class ReplicateLike(nn.Linear):
    """torch's composable replicate(): the same setter, without ``recurse``."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.sync = True

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.sync = flag


class DDPLike(nn.Module):
    """DDP or FSDP1 as far as hwoptim can tell: ``no_sync()``."""

    def __init__(self, module: nn.Module | None = None) -> None:
        super().__init__()
        self.module = module or nn.Linear(2, 2)
        self.sync = True
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.entered += 1
        self.sync = False
        try:
            yield
        finally:
            self.sync = True


def test_fsdp2_submodules_of_an_unsharded_root_are_each_switched_off_and_back_on() -> None:
    model = nn.Sequential(FSDP2Like(), nn.Tanh(), nn.Sequential(FSDP2Like()))
    shards = [model[0], model[2][0]]
    with skip_gradient_sync(model):
        assert [m.sync for m in shards] == [False, False]
    assert [m.sync for m in shards] == [True, True]
    # each alone (recurse=False): the skip already lists every FSDP2 module
    assert all(m.calls == [(False, False), (True, False)] for m in shards)


def test_a_sharded_root_and_its_sharded_children_are_all_switched() -> None:
    class ShardedRoot(FSDP2Like):
        def __init__(self) -> None:
            super().__init__()
            self.block = FSDP2Like()

    model = ShardedRoot()
    with skip_gradient_sync(model):
        assert (model.sync, model.block.sync) == (False, False)
    assert (model.sync, model.block.sync) == (True, True)


def test_a_setter_without_recurse_is_called_with_the_flag_only() -> None:
    model = nn.Sequential(ReplicateLike())
    with skip_gradient_sync(model):
        assert model[0].sync is False
    assert model[0].sync is True


def test_a_root_with_no_sync_is_used_as_is() -> None:
    model = DDPLike(nn.Sequential(DDPLike()))
    with skip_gradient_sync(model):
        assert model.sync is False
    assert (model.entered, model.module[0].entered) == (1, 0)


def test_separately_wrapped_submodules_of_a_plain_root_enter_each_no_sync() -> None:
    # e.g. a GAN whose generator and discriminator are each wrapped in DDP
    inner = DDPLike()
    model = nn.ModuleDict({"g": DDPLike(nn.Sequential(inner)), "d": DDPLike()})
    with skip_gradient_sync(model):
        assert (model["g"].sync, model["d"].sync) == (False, False)
    assert (model["g"].sync, model["d"].sync) == (True, True)
    assert inner.entered == 0  # only the outermost wrappers


def test_a_plain_module_needs_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    for _ in range(2):  # first sight, then the remembered decision
        assert isinstance(skip_gradient_sync(model), contextlib.nullcontext)


def test_a_torch_compiled_model_is_looked_through() -> None:
    model = nn.Sequential(FSDP2Like())
    compiled = torch.compile(model)  # nothing is compiled until it is called
    with skip_gradient_sync(compiled):
        assert model[0].sync is False
    assert model[0].sync is True


def test_the_module_tree_is_walked_once_per_model() -> None:
    walks = []

    class Counting(nn.Sequential):
        def modules(self) -> Iterator[nn.Module]:
            walks.append(1)
            return super().modules()

    model = Counting(FSDP2Like())
    for _ in range(5):
        with skip_gradient_sync(model):
            pass
    assert len(walks) == 1
    assert model[0].calls == [(False, False), (True, False)] * 5


def test_the_decision_never_keeps_a_model_alive() -> None:
    model = nn.Sequential(FSDP2Like(), DDPLike())
    with skip_gradient_sync(model):
        pass
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_replaced_submodule_is_found_again() -> None:
    model = nn.Sequential(FSDP2Like())
    with skip_gradient_sync(model):
        pass
    model[0] = FSDP2Like()  # the old one is gone: the remembered decision is stale
    gc.collect()
    with skip_gradient_sync(model):
        assert model[0].sync is False
    assert model[0].sync is True


def test_objects_that_cannot_be_weakly_referenced_still_skip() -> None:
    class Slotted:
        __slots__ = ("sync",)

        def __init__(self) -> None:
            self.sync = True

        def set_requires_gradient_sync(self, flag: bool) -> None:
            self.sync = flag

    model = Slotted()
    with skip_gradient_sync(model):
        assert model.sync is False
    assert model.sync is True


@pytest.mark.parametrize("pattern", ["mmengine", "inside"])
def test_fsdp2_submodule_skip_lasts_until_the_backward_of_each_non_updating_micro_batch(
    pattern: str,
) -> None:
    model = nn.Sequential(FSDP2Like(), nn.Tanh(), FSDP2Like())
    seen: list[tuple[bool, bool]] = []
    model[0].weight.register_hook(lambda g: seen.append((model[0].sync, model[2].sync)))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 5)
    run_micro_batches(wrapper, model, 5, pattern)
    # windows [0,1] [2,3] [4]: sync off in the backward of 0 and 2 only, both modules
    assert [a for a, _ in seen] == [False, True, False, True, True]
    assert [b for _, b in seen] == [False, True, False, True, True]
    assert (model[0].sync, model[2].sync) == (True, True)


def test_every_built_in_backend_skips_through_the_shared_default() -> None:
    model = nn.Sequential(FSDP2Like())
    with get_backend("cpu").no_sync(model):
        assert model[0].sync is False
    assert model[0].sync is True


class Boom(Exception):
    pass


@pytest.mark.parametrize("backend", ["cpu", "cuda", "npu", "xpu", "mps"])
def test_an_exception_leaving_a_backends_no_sync_turns_every_fsdp2_shard_back_on(backend: str) -> None:
    """Users call ``Backend.no_sync()`` directly (the wrapper always leaves it cleanly):
    an error inside the context, in a forward or backward, must not leave a shard that
    never synchronises again."""
    class ShardedRoot(FSDP2Like):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(FSDP2Like(), nn.Tanh(), ReplicateLike())

    model = ShardedRoot()
    shards = [model, model.blocks[0], model.blocks[2]]
    skip = list_backends()[backend]().no_sync(model)  # no device needed to skip a sync
    with pytest.raises(Boom), skip:
        assert [m.sync for m in shards] == [False, False, False]
        raise Boom
    assert [m.sync for m in shards] == [True, True, True]
    with skip_gradient_sync(model):  # and the next skip still works
        assert [m.sync for m in shards] == [False, False, False]
    assert [m.sync for m in shards] == [True, True, True]


def test_an_exception_leaving_the_skip_of_several_ddp_parts_ends_each_no_sync() -> None:
    model = nn.Sequential(DDPLike(), nn.Tanh(), DDPLike())
    with pytest.raises(Boom), get_backend("cpu").no_sync(model):
        assert (model[0].sync, model[2].sync) == (False, False)
        raise Boom
    assert (model[0].sync, model[2].sync) == (True, True)


class StaticGraphDDPLike(DDPLike):
    """DDP(static_graph=True) as hwoptim sees it: the flag DDP sets in the first synchronised
    backward, set here by a gradient hook that runs only while synchronising."""

    def __init__(self) -> None:
        super().__init__()
        self.static_graph = True
        self._static_graph_delay_allreduce_enqueued = False
        self.backward_syncing: list[bool] = []
        self.module.weight.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self.backward_syncing.append(self.sync)
        if self.sync:
            self._static_graph_delay_allreduce_enqueued = True
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_a_static_graph_ddp_is_not_switched_off_before_its_first_synchronised_backward() -> None:
    model = StaticGraphDDPLike()
    with skip_gradient_sync(model):
        assert model.sync is True  # torch cannot start a static graph under no_sync()
    model._static_graph_delay_allreduce_enqueued = True
    with skip_gradient_sync(model):
        assert model.sync is False
    assert model.entered == 1


def test_static_graph_ddp_parts_of_a_plain_root_start_synchronised_too() -> None:
    model = nn.ModuleDict({"g": StaticGraphDDPLike(), "d": DDPLike()})
    with skip_gradient_sync(model):
        assert (model["g"].sync, model["d"].sync) == (True, False)
    assert (model["g"].entered, model["d"].entered) == (0, 1)


@pytest.mark.parametrize("pattern", ["mmengine", "inside"])
def test_static_graph_ddp_synchronises_the_first_micro_batch_then_skips_as_usual(
    pattern: str,
) -> None:
    model = StaticGraphDDPLike()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=3)
    wrapper.initialize_count_status(model, 0, 9)
    run_micro_batches(wrapper, model, 9, pattern)
    # windows [0,1,2] [3,4,5] [6,7,8]: only micro-batch 0 syncs where it would not otherwise
    assert model.backward_syncing == [True, False, True] + [False, False, True] * 2


def test_a_ddp_whose_static_graph_flag_is_unknown_to_torch_is_switched_off() -> None:
    model = StaticGraphDDPLike()
    del model._static_graph_delay_allreduce_enqueued  # a torch that handles no_sync itself
    with skip_gradient_sync(model):
        assert model.sync is False
