"""The emulated accelerator itself (hwoptim/testing/emulated.py): a device that behaves like
one where placement matters, runs what a training step needs, and counts host reads."""

from __future__ import annotations

import copy
import io
import sys
import threading
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import hwoptim
from hwoptim.testing import emulated
from hwoptim.testing.emulated import count_host_reads

# -- a device torch and hwoptim see ------------------------------------------------------------


def test_torch_reports_it_as_the_accelerator_and_auto_picks_it(device):
    assert torch.accelerator.current_accelerator() == torch.device(device.type)
    assert torch.accelerator.device_count() == emulated.DEFAULT_DEVICE_COUNT
    backend = hwoptim.get_backend("auto")
    assert backend.name == device.type and backend.device() == device
    assert hwoptim.AmpOptimWrapper(torch.optim.SGD([nn.Parameter(torch.ones(1, device=device))])).device == device


def test_installing_again_is_a_no_op_but_another_name_is_an_error(device):
    assert emulated.install(device.type) == device.type
    other = "emu" if device.type != "emu" else "npu"
    with pytest.raises(RuntimeError, match=f"already installed in this process as {device.type!r}"):
        emulated.install(other)
    with pytest.raises(RuntimeError, match="with 2 device"):
        emulated.install(device.type, device_count=3)


def test_named_npu_it_brings_a_torch_npu_for_the_npu_backend(device):
    if device.type != "npu":
        assert "torch_npu" not in sys.modules
        return
    import torch_npu

    backend = hwoptim.get_backend("auto")
    assert type(backend).__name__ == "NpuBackend"
    assert backend.vendor_versions()["torch_npu"] == torch_npu.__version__
    scaler = backend.grad_scaler(init_scale=8.0)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler._device == "npu"


@pytest.mark.parametrize("index", [0, 1])
def test_every_device_runs_backward_from_any_thread(device, index):
    """Torch's engine sizes its device queues by the Python device guard's count (always 1)."""
    where = torch.device(device.type, index)
    torch.manual_seed(0)
    cpu_model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model = copy.deepcopy(cpu_model).to(where)
    cpu_x = torch.randn(5, 3)
    x = cpu_x.to(where)
    input_grads: list[torch.Tensor] = []

    def run() -> None:
        model(x).sum().backward()
        leaf = x.detach().requires_grad_()
        input_grads.append(torch.autograd.grad(model(leaf).pow(2).sum(), leaf)[0])

    run()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert [g.device for g in input_grads] == [where, where]
    for _ in range(2):
        cpu_model(cpu_x).sum().backward()
    for got, want in zip(model.parameters(), cpu_model.parameters()):
        assert got.grad is not None and got.grad.device == where
        torch.testing.assert_close(got.grad.cpu(), want.grad)


# -- placement errors like CUDA's ---------------------------------------------------------------


def test_a_cpu_tensor_mixed_in_is_an_error(device):
    x = torch.ones(2, 3, device=device)
    for op in (lambda: x + torch.ones(2, 3), lambda: x @ torch.ones(3, 2), lambda: torch.cat([x, torch.ones(1, 3)]),
               lambda: nn.functional.linear(x, torch.ones(4, 3))):
        with pytest.raises(RuntimeError, match=f"same device.*{device.type}:0 and cpu"):
            op()


def test_cpu_scalars_and_cpu_indices_are_allowed_as_on_cuda(device):
    x = torch.arange(6.0, device=device)
    assert torch.equal((x * torch.tensor(2.0)).cpu(), torch.arange(6.0) * 2)
    assert torch.equal(x[torch.tensor([0, 5])].cpu(), torch.tensor([0.0, 5.0]))
    x[torch.tensor([1])] = torch.tensor(9.0, device=device)
    assert float(x[1]) == 9.0


def test_device_one_is_another_device(device):
    other = torch.device(device.type, 1)
    a, b = torch.ones(2, device=device), torch.ones(2, device=other)
    assert b.device == other and (b * 2).device == other
    with pytest.raises(RuntimeError, match=f"{device.type}:0 and {device.type}:1"):
        a + b
    assert torch.equal((a + b.to(device)).cpu(), torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="invalid device ordinal 2"):
        torch.ones(1, device=torch.device(device.type, 2))


def test_module_to_replaces_the_parameters_unlike_cuda(device):
    """Why an optimizer must be built after model.to(device) (docs/devices.md)."""
    model = nn.Linear(2, 2)
    before = model.weight
    model.to(device)
    assert model.weight is not before and before.device.type == "cpu"


# -- ops agree with the CPU ---------------------------------------------------------------------


def _inplace_through_view(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y.t()[0].mul_(10)  # a write through a view reaches the base
    return y


def _out_argument(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(0, device=x.device)
    torch.add(x, 1, out=out)  # resized by the kernel
    return out


def _resize(x: torch.Tensor) -> torch.Tensor:
    y = x.clone().reshape(-1)
    y.resize_(30)
    return y[:12]


OPS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: x + y,
    "mul_scalar": lambda x, y: x * 3 - y / 2,
    "matmul": lambda x, y: x @ y.t(),
    "sum_dim": lambda x, y: x.sum(1, keepdim=True),
    "mean": lambda x, y: x.mean(),
    "max": lambda x, y: x.max(dim=1).values,
    "argmax": lambda x, y: x.argmax(1),
    "softmax": lambda x, y: torch.softmax(x, -1),
    "log_softmax": lambda x, y: torch.log_softmax(x, 0),
    "where": lambda x, y: torch.where(x > 0, x, y),
    "clamp": lambda x, y: x.clamp(-0.5, 0.5),
    "cumsum": lambda x, y: x.cumsum(0),
    "sort": lambda x, y: x.sort(1).values,
    "topk": lambda x, y: x.topk(2, 1).indices,
    "cat_stack": lambda x, y: torch.stack([torch.cat([x, y]), torch.cat([y, x])]),
    "transpose_contiguous": lambda x, y: x.t().contiguous(),
    "index_select": lambda x, y: x.index_select(0, torch.tensor([2, 0]).to(x.device)),
    "gather": lambda x, y: x.gather(1, torch.tensor([[0], [1], [2]]).to(x.device)),
    "scatter_add": lambda x, y: torch.zeros(3, 4, device=x.device).scatter_add(
        1, torch.tensor([[0, 1, 1, 0]] * 3).to(x.device), y),
    "masked_fill": lambda x, y: x.masked_fill(y > 0, 0.0),
    "norm": lambda x, y: torch.linalg.vector_norm(x),
    "isfinite": lambda x, y: torch.isfinite(x / (y > 0).float()),
    "nan_to_num": lambda x, y: (x / 0).nan_to_num(0.0, 1.0, -1.0),
    "to_half_and_back": lambda x, y: x.half().bfloat16().float(),
    "expand_add": lambda x, y: x[:, :1].expand(3, 4) + y,
    "inplace_through_view": lambda x, y: _inplace_through_view(x),
    "out_argument": lambda x, y: _out_argument(x),
    "resize": lambda x, y: _resize(x),
    "empty_tensor": lambda x, y: x[:0].sum(0) + x[:, :0].sum(),
    "foreach_mul": lambda x, y: torch.stack(torch._foreach_mul([x, y], 2.0)),
    "arange_like": lambda x, y: torch.arange(4, device=x.device) * x[0],
    "conv1d": lambda x, y: nn.functional.conv1d(x[None], y[:, :, None].permute(1, 0, 2)[:2, :3]),
    "max_pool": lambda x, y: nn.functional.max_pool1d(x[None], 2),
    "embedding": lambda x, y: nn.functional.embedding(torch.tensor([[2, 0]]).to(x.device), y),
    "cross_entropy": lambda x, y: nn.functional.cross_entropy(x, torch.tensor([0, 3, 1]).to(x.device)),
    "mse_loss": lambda x, y: nn.functional.mse_loss(x, y),
    "layer_norm": lambda x, y: nn.functional.layer_norm(x, (4,)),
    "batch_norm": lambda x, y: nn.functional.batch_norm(x, None, None, training=True),
}


@pytest.mark.parametrize("name", OPS)
def test_op_matches_the_cpu(device, name):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    want = OPS[name](x, y)
    got = OPS[name](x.to(device), y.to(device))
    assert got.device == device
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_structured_ops_resize_their_own_outputs_silently(device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mse_loss.out resizes its 0-dim output on the CPU kernel's way
        loss = nn.functional.mse_loss(torch.ones(3, device=device), torch.zeros(3, device=device))
    assert loss.shape == () and float(loss) == 1.0


def test_set_device_moves_where_unindexed_tensors_go(device):
    module = getattr(torch, device.type)
    try:
        module.set_device(1)
        assert torch.ones(1, device=device.type).device.index == 1
        with module.device(0):
            assert torch.ones(1, device=device.type).device.index == 0
    finally:
        module.set_device(0)


# -- a training step -------------------------------------------------------------------------


class Net(nn.Module):
    """Embedding, conv, norms, dropout, linear: what the issue lists."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        # no bias before a batch norm: its gradient is rounding noise, which Adam amplifies
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(4)
        self.layer_norm = nn.LayerNorm(8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * 4 * 4 + 8, 5)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.batch_norm(self.conv(image)).relu().flatten(1)
        b = self.layer_norm(self.embedding(tokens)).mean(1)
        return self.head(self.dropout(torch.cat([a, b], 1)))


def _train(where: Any, optimizer_cls: type, opt_kw: dict[str, Any], dropout: float = 0.0) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Net(dropout).to(where)
    optimizer = optimizer_cls(model.parameters(), lr=1e-2, **opt_kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        image = torch.randn(2, 3, 4, 4, generator=g).to(where)
        tokens = torch.randint(0, 10, (2, 3), generator=g).to(where)
        target = torch.randint(0, 5, (2,), generator=g).to(where)
        nn.functional.cross_entropy(model(image, tokens), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    for state in optimizer.state.values():
        assert all(v.device == next(model.parameters()).device for k, v in state.items()
                   if torch.is_tensor(v) and k != "step")
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("form", [dict(foreach=False), dict(foreach=True), dict(fused=True)], ids=str)
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW],
                         ids=lambda c: c.__name__)
def test_training_matches_the_cpu(device, optimizer_cls, form):
    kw = dict(form, momentum=0.9) if optimizer_cls is torch.optim.SGD else form
    for got, want in zip(_train(device, optimizer_cls, kw), _train("cpu", optimizer_cls, kw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_trains_and_is_random(device):
    first = _train(device, torch.optim.AdamW, {}, dropout=0.5)
    assert all(torch.isfinite(p).all() for p in first)
    x = torch.ones(1000, device=device)
    dropped = nn.functional.dropout(x, 0.5)
    assert dropped.device == device and 300 < int((dropped == 0).sum()) < 700


def test_manual_seed_makes_device_randomness_repeat(device):
    torch.manual_seed(3)
    first = torch.randn(5, device=device)
    torch.manual_seed(3)
    assert torch.equal(first.cpu(), torch.randn(5, device=device).cpu())


# -- autocast and loss scaling -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_really_computes_in_the_low_dtype(device, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    with torch.autocast(device.type, dtype=dtype):
        product = a.to(device) @ b.to(device)
        probabilities = torch.softmax(product, -1)
        loss = nn.functional.cross_entropy(product, torch.zeros(32, dtype=torch.long, device=device))
    assert product.dtype == dtype
    assert torch.equal(product.cpu(), a.to(dtype) @ b.to(dtype))  # the low-precision matmul itself
    assert probabilities.dtype == torch.float32 and loss.dtype == torch.float32
    assert (a.to(device) @ b.to(device)).dtype == torch.float32  # off outside the block


def test_grad_scaler_skips_an_inf_step_and_backs_off(device):
    model = nn.Linear(4, 2).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    before = [p.detach().cpu().clone() for p in model.parameters()]
    with torch.autocast(device.type, dtype=torch.float16):
        loss = model(torch.ones(3, 4, device=device)).float().sum() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p.detach().cpu(), q) for p, q in zip(model.parameters(), before))
    scale = scaler._get_scale_async()
    assert scale.device == device and float(scale) == 512.0


# -- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("map_location", [None, "cpu", "device:1"])
def test_save_and_load_with_and_without_map_location(device, map_location):
    model = nn.Linear(3, 2).to(device)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    if map_location == "device:1":
        map_location = f"{device.type}:1"
    loaded = torch.load(buffer, map_location=map_location, weights_only=True)
    expected = torch.device(map_location) if map_location else device
    for name, tensor in loaded.items():
        assert tensor.device == expected
        assert torch.equal(tensor.cpu(), model.state_dict()[name].cpu())


def test_a_cpu_checkpoint_loads_onto_the_device_and_storages_allocate(device):
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location=device, weights_only=True)
    assert loaded["w"].device == device and loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    storage = torch.UntypedStorage(16, device=device)  # torch's own path would crash here
    assert storage.device == device and storage.nbytes() == 16


def test_deepcopy_and_synchronize(device):
    model = nn.Linear(2, 2).to(device)
    twin = copy.deepcopy(model)
    assert twin.weight.device == device and torch.equal(twin.weight.cpu(), model.weight.cpu())
    hwoptim.get_backend("auto").synchronize()


# -- host reads -------------------------------------------------------------------------------


def test_host_reads_are_counted_by_kind(device):
    x = torch.ones(3, device=device)
    with count_host_reads() as outer:
        y = (x * 2).sum()  # device work only
        assert outer.total == 0
        with count_host_reads() as inner:
            y.item()
            bool(x.all())
            _ = x.cpu()
            _ = x.tolist()
            torch.equal(x, x)
        _ = x.nonzero()
    assert inner.ops == {"aten::_local_scalar_dense": 2, "copy to cpu": 2, "aten::equal": 1}
    assert outer.total == inner.total + 1 and outer.ops["aten::nonzero"] == 1
    assert str(inner).startswith("5 host read(s): aten::_local_scalar_dense x2")
