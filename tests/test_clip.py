"""clip_grad validation: every bad config is refused at construction with a message that helps."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from hwoptim.clip import ClipGrad, parse_clip_grad


def test_none_means_no_clipping():
    assert parse_clip_grad(None) is None


def test_norm_is_the_default_type():
    clip = ClipGrad(dict(max_norm=1))
    assert clip.kind == "norm"
    assert clip.kwargs == {"max_norm": 1.0, "norm_type": 2.0}


def test_norm_options():
    clip = ClipGrad(dict(type="norm", max_norm=2.0, norm_type="inf", error_if_nonfinite=True, foreach=False))
    assert clip.norm_type == math.inf
    assert clip.kwargs == {"max_norm": 2.0, "norm_type": math.inf, "error_if_nonfinite": True, "foreach": False}


def test_infinite_max_norm_is_allowed_to_measure_only():
    assert ClipGrad(dict(max_norm=math.inf)).max_norm == math.inf


def test_value_options():
    assert ClipGrad(dict(type="value", clip_value=0.5, foreach=True)).kwargs == {"clip_value": 0.5, "foreach": True}


@pytest.mark.parametrize(
    ("cfg", "error", "match"),
    [
        ([], TypeError, "clip_grad must be a dict"),
        ("norm", TypeError, "clip_grad must be a dict"),
        ({}, ValueError, "type 'norm' needs 'max_norm'"),
        (dict(type="foo", max_norm=1), ValueError, "clip_grad type 'foo' is not one of 'norm', 'value'"),
        (dict(norm_type=2), ValueError, "needs 'max_norm'"),
        (dict(type="value"), ValueError, "needs 'clip_value'"),
        (dict(max_norm=1, clip_value=2), ValueError, "does not take 'clip_value'; it takes"),
        (dict(type="value", clip_value=1, max_norm=1), ValueError, "does not take 'max_norm'"),
        (dict(max_norm="1"), ValueError, "max_norm must be a number"),
        (dict(max_norm=True), ValueError, "max_norm must be a number"),
        (dict(max_norm=0), ValueError, r"max_norm must be a positive number \(or inf\)"),
        (dict(max_norm=-1), ValueError, "max_norm must be a positive number"),
        (dict(max_norm=math.nan), ValueError, "max_norm must be a positive number"),
        (dict(max_norm=1, norm_type=0), ValueError, "norm_type must be a positive number"),
        (dict(max_norm=1, error_if_nonfinite=1), TypeError, "error_if_nonfinite must be True or False"),
        (dict(max_norm=1, foreach="yes"), TypeError, "foreach must be True, False or None"),
        (dict(type="value", clip_value=math.nan), ValueError, "clip_value must be a positive finite"),
    ],
)
def test_bad_configs(cfg, error, match):
    with pytest.raises(error, match=match):
        ClipGrad(cfg)


def test_numpy_scalars_are_numbers_and_become_plain_floats():
    np = pytest.importorskip("numpy")
    norm = ClipGrad(dict(max_norm=np.float32(1.5), norm_type=np.int64(1)))
    value = ClipGrad(dict(type="value", clip_value=np.float16(0.5)))
    assert norm.kwargs == {"max_norm": 1.5, "norm_type": 1.0}
    assert value.kwargs == {"clip_value": 0.5}
    assert {type(v) for v in (*norm.kwargs.values(), *value.kwargs.values())} == {float}
    assert ClipGrad(dict(max_norm=np.float64("inf"))).max_norm == math.inf


@pytest.mark.parametrize(
    "bad", ["np.bool_(True)", "np.float32(0)", "np.float64('nan')", "np.array(1.0)", "torch.tensor(1.0)"]
)
def test_what_is_no_positive_number_is_refused_whatever_its_type(bad):
    np = pytest.importorskip("numpy")
    value = eval(bad, {"np": np, "torch": torch})
    with pytest.raises(ValueError, match="max_norm must be a") as caught:
        ClipGrad(dict(max_norm=value))
    if "array" in bad or "tensor" in bad:
        assert "pass float(x) or int(x)" in str(caught.value)


def test_the_config_is_not_mutated():
    cfg = dict(type="norm", max_norm=1.0)
    ClipGrad(cfg)
    assert cfg == dict(type="norm", max_norm=1.0)


def test_kwargs_is_a_fresh_copy():
    clip = ClipGrad(dict(max_norm=1.0))
    clip.kwargs["max_norm"] = 5
    assert clip.kwargs["max_norm"] == 1.0


def test_norm_clip_fn_returns_the_pre_clip_norm():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    norm = ClipGrad(dict(max_norm=1.0)).clip_fn()([p])[0]
    assert float(norm) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_value_clip_fn_clamps_and_returns_the_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, -4.0])
    norm = ClipGrad(dict(type="value", clip_value=1.0)).clip_fn()([p])[0]
    assert float(norm) == pytest.approx(5.0)
    assert p.grad.tolist() == [1.0, -1.0]


def test_value_clip_fn_without_gradients():
    p = torch.nn.Parameter(torch.zeros(2))
    assert float(ClipGrad(dict(type="value", clip_value=1.0)).clip_fn()([p])[0]) == 0.0


def test_error_if_nonfinite_raises_unless_a_scaler_will_skip():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([math.inf, 1.0])
    clip = ClipGrad(dict(max_norm=1.0, error_if_nonfinite=True))
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_fn()([p])[0]
    assert not torch.isfinite(clip.clip_fn(scaled=True)([p])[0])


def test_a_model_with_its_own_clip_grad_norm_is_clipped_through_it():
    class Sharded(torch.nn.Module):
        def clip_grad_norm_(self, max_norm, norm_type):
            return torch.tensor(max_norm * 10 + norm_type)

    fn = ClipGrad(dict(max_norm=1.0, norm_type=1)).clip_fn(Sharded())
    assert float(fn([])[0]) == 11.0


def test_a_clip_config_pickles():
    clip = ClipGrad(dict(max_norm=2.0, norm_type="inf", foreach=False))
    assert pickle.loads(pickle.dumps(clip)).kwargs == clip.kwargs


def test_repr_reads_like_the_config():
    assert repr(ClipGrad(dict(type="value", clip_value=2))) == "dict(type='value', clip_value=2.0)"


def _grads(*values: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v)
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_norm_clipping_is_torch_clip_grad_norm_exactly(norm_type):
    ours, theirs = _grads([3.0, -4.0], [0.5]), _grads([3.0, -4.0], [0.5])
    norm = ClipGrad(dict(max_norm=1.0, norm_type=norm_type)).clip_fn()(ours)[0]
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert torch.equal(norm, want)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_before_torch_2_6_the_same_clipping_is_done_by_hand(monkeypatch, norm_type):
    # torch < 2.6 has neither get_total_norm nor clip_grads_with_norm_
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    ours, theirs = _grads([3.0, -4.0], [0.5]), _grads([3.0, -4.0], [0.5])
    norm = ClipGrad(dict(max_norm=1.0, norm_type=norm_type)).clip_fn()(ours)[0]
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(norm, want)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    # the message torch's own says too, so that it reads the same on every torch
    with pytest.raises(RuntimeError, match=r"non-finite.*cannot be clipped"):
        ClipGrad(dict(max_norm=1.0, error_if_nonfinite=True)).clip_fn()(_grads([math.nan]))[0]


# -- what mutation testing found unchecked (docs/contributing.md) --------------------------------


@pytest.mark.parametrize(
    ("cfg", "error", "message"),
    [
        (5, TypeError, "clip_grad must be a dict such as dict(max_norm=1.0) or "
         "dict(type='value', clip_value=0.5); got int"),
        (dict(max_norm=1, clip_value=2), ValueError,
         "clip_grad type 'norm' does not take 'clip_value'; it takes error_if_nonfinite, "
         "foreach, max_norm, norm_type, per_group"),
        (dict(type="value", clip_value=1, max_norm=1, norm_type=2), ValueError,
         "clip_grad type 'value' does not take 'max_norm', 'norm_type'; it takes clip_value, foreach"),
        (dict(max_norm=-1), ValueError, "clip_grad 'norm': max_norm must be"),
        (dict(max_norm=1, norm_type=0), ValueError, "clip_grad 'norm': norm_type must be"),
        (dict(max_norm=1, error_if_nonfinite=1), TypeError,
         "clip_grad 'norm': error_if_nonfinite must be True or False; got 1"),
        (dict(max_norm=1, foreach=1), TypeError, "clip_grad 'norm': foreach must be True, False or None; got 1"),
        (dict(type="value", clip_value=-1), ValueError, "clip_grad 'value': clip_value must be"),
    ],
)
def test_a_bad_config_is_named_in_full(cfg, error, message):
    """The message names the clip type, the key and every key that type takes."""
    with pytest.raises(error) as caught:
        ClipGrad(cfg)
    assert str(caught.value).startswith(message), str(caught.value)


def test_parse_clip_grad_validates_a_dict_into_a_clip_grad():
    clip = parse_clip_grad(dict(type="value", clip_value=2))
    assert isinstance(clip, ClipGrad) and clip.kwargs == {"clip_value": 2.0}


def test_repr_of_a_norm_config_lists_its_arguments():
    assert repr(ClipGrad(dict(max_norm=1, norm_type=1, foreach=True))) == (
        "dict(type='norm', max_norm=1.0, norm_type=1.0, foreach=True)"
    )


@pytest.mark.parametrize("kind", ["norm", "value"])
def test_without_gradients_the_norm_is_a_zero_scalar(kind):
    cfg = dict(max_norm=1.0) if kind == "norm" else dict(type="value", clip_value=1.0)
    norm = ClipGrad(cfg).clip_fn()([torch.nn.Parameter(torch.zeros(2))])[0]
    assert norm.shape == () and norm.dtype == torch.float32 and norm.item() == 0.0


@pytest.mark.parametrize("foreach", [None, True, False])
def test_value_clipping_an_inf_gradient_measures_it_and_never_raises(foreach):
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([math.inf, 1.0])
    norm = ClipGrad(dict(type="value", clip_value=0.5, foreach=foreach)).clip_fn()([p])[0]
    assert norm.item() == math.inf
    assert p.grad.tolist() == [0.5, 0.5]


class _OwnClip(torch.nn.Module):
    """An FSDP1-like module: clips through its own clip_grad_norm_, which returns ``norm``."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        self.norm = norm

    def clip_grad_norm_(self, max_norm, norm_type):
        return torch.tensor(self.norm)


@pytest.mark.parametrize("norm", [math.inf, math.nan])
def test_a_modules_own_clip_raises_on_a_nonfinite_norm_only_when_asked(norm):
    assert not math.isfinite(ClipGrad(dict(max_norm=1.0)).clip_fn(_OwnClip(norm))([])[0].item())
    asked = ClipGrad(dict(max_norm=1.0, error_if_nonfinite=True))
    assert not math.isfinite(asked.clip_fn(_OwnClip(norm), scaled=True)([])[0].item())
    message = (
        r"the total gradient norm is non-finite \((inf|nan)\), so it cannot be clipped; pass clip_grad "
        r"error_if_nonfinite=False to have such steps skipped or zeroed instead$"
    )
    with pytest.raises(RuntimeError, match=message):
        asked.clip_fn(_OwnClip(norm))([])[0]
    assert asked.clip_fn(_OwnClip(3.0))([])[0].item() == 3.0  # a finite norm never raises


