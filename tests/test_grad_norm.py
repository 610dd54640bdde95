"""hwoptim._grad_norm on one process: the total and per-group norms of plain tensors.

The DTensor paths run for real on 4 ranks in tests/test_grad_norm_dist.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_host_sync import HostSyncDetector

from hwoptim._grad_norm import _reduction_groups, by_mesh, grad_norms


def _groups() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)],
        [],
        [torch.randn(2, 2, generator=g).double(), torch.randn(4, generator=g)],
        [torch.randn(1, generator=g)],
    ]


def _reference(groups: list[list[torch.Tensor]], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    per_group = torch.stack([
        torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in group]), p)
        if group else torch.zeros((), dtype=torch.float64)
        for group in groups
    ])
    return torch.linalg.vector_norm(per_group, p), per_group


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_total_and_per_group_norms_are_the_norms_of_the_concatenated_tensors(p, foreach):
    groups = _groups()
    total, per_group = grad_norms(groups, p, foreach)
    want_total, want_groups = _reference(groups, p)
    assert total.shape == () and per_group.shape == (4,)
    torch.testing.assert_close(total.double(), want_total, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_group.double(), want_groups, rtol=1e-6, atol=0)
    assert per_group[1] == 0  # the empty group


@pytest.mark.skipif(
    not hasattr(torch.nn.utils, "get_total_norm"), reason="torch before 2.6 has no get_total_norm"
)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_one_group_is_torch_get_total_norm_bit_for_bit(p):
    tensors = _groups()[0]
    total, per_group = grad_norms([tensors], p)
    want = torch.nn.utils.get_total_norm(tensors, p)
    assert torch.equal(total, want) and total.dtype == want.dtype
    assert torch.equal(per_group, want.reshape(1))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_a_non_finite_value_reaches_its_group_and_the_total_only(p, bad):
    groups = _groups()
    groups[2][1][0] = bad
    total, per_group = grad_norms(groups, p)
    for value in (total, per_group[2]):
        assert value.isnan() if math.isnan(bad) else value == math.inf
    assert torch.isfinite(per_group[[0, 1, 3]]).all()


def test_empty_tensors_and_groups_have_norm_zero_also_for_inf():
    groups = [[torch.zeros(0), torch.tensor([-3.0, 2.0])], [torch.zeros(0, 4)], []]
    total, per_group = grad_norms(groups, math.inf)
    assert per_group.tolist() == [3.0, 0.0, 0.0] and total.item() == 3.0
    total, per_group = grad_norms([[], []], 2.0, device="cpu")
    assert total.item() == 0.0 and per_group.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("norm_type", [0.0, -1.0, math.nan])
def test_a_norm_type_that_is_not_positive_is_refused(norm_type):
    with pytest.raises(ValueError, match="norm_type must be a positive number or inf"):
        grad_norms([[torch.ones(2)]], norm_type)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_grad_norms_makes_no_host_sync(p):
    groups = _groups()
    with HostSyncDetector() as detector:
        grad_norms(groups, p)
        grad_norms([groups[0]], p)
    assert detector.by("hwoptim") == []


def test_by_mesh_splits_parameters_by_their_gradients_mesh():
    class Mesh:
        pass

    class Grad(torch.Tensor):
        device_mesh: object

    a, b = Mesh(), Mesh()
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(5)]
    for param, mesh in zip(params, [None, a, b, a, "no grad"]):
        if mesh == "no grad":
            continue
        grad = torch.zeros(1)
        if mesh is not None:
            grad = grad.as_subclass(Grad)
            grad.device_mesh = mesh
        param.grad = grad
    buckets = by_mesh(params)
    ids = [id(p) for p in params]
    assert [[ids.index(id(p)) for p in bucket] for bucket in buckets] == [[0], [1, 3], [2]]


class _FakeMesh:
    """A DeviceMesh as _reduction_groups reads it: ndim, size(), get_group()."""

    def __init__(self, *shape: int) -> None:
        self.shape = shape
        self.ndim = len(shape)

    def size(self, dim: int | None = None) -> int:
        return math.prod(self.shape) if dim is None else self.shape[dim]

    def get_group(self, dim: int) -> str:
        return f"group of dim {dim}"


def test_all_ranks_reduce_in_the_default_group_a_smaller_mesh_over_each_dimension():
    assert _reduction_groups(None, world=8) == (None,)
    assert _reduction_groups(None, world=1) == ()  # nothing to reduce on one rank
    assert _reduction_groups(_FakeMesh(2, 1, 2), world=8) == ("group of dim 0", "group of dim 2")
    assert _reduction_groups(_FakeMesh(4), world=8) == ("group of dim 0",)
