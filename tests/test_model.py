"""StreamMLP: builder options, and growth that keeps what was learned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stream_trainer.errors import ConfigError
from stream_trainer.model import StreamMLP, grow_linear_
from stream_trainer.norms import EMABatchNorm, LayerNorm, WeightStandardizedLinear


def _trained(out_features: int = 3, norm: str = "layer") -> tuple[StreamMLP, torch.optim.Adam]:
    torch.manual_seed(0)
    model = StreamMLP(5, out_features, hidden=(8, 6), norm=norm)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        x, y = torch.randn(4, 5), torch.randint(0, out_features, (4,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_builder_options_and_per_layer_norms() -> None:
    model = StreamMLP(
        4,
        2,
        hidden=(8, 8, 8),
        norm=("layer", "ema_batch", "group"),
        norm_options={"ema_batch": {"momentum": 0.2}},
        activation="tanh",
        dropout=0.1,
    )
    norms = [layer for _, layer in model.norm_layers()]
    assert isinstance(norms[0], LayerNorm) and isinstance(norms[1], EMABatchNorm)
    assert norms[1].momentum == 0.2
    assert isinstance(model.body[-4], WeightStandardizedLinear)  # group asks for WS
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3
    assert model(torch.randn(1, 4)).shape == (1, 2)
    assert not model.mode_independent and model.uses_rng
    assert StreamMLP(4, 2, hidden=(8,), norm="layer").mode_independent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "nope"}, "unknown norm 'nope'; valid:"),
        ({"norm": ("layer",)}, "1 names for 2 hidden layers"),
        ({"activation": "swish"}, "unknown activation"),
        ({"dropout": 1.5}, "dropout"),
        ({"hidden": (0, 4)}, "positive"),
    ],
)
def test_builder_rejects_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StreamMLP(3, 2, **{"hidden": (4, 4), **kwargs})  # type: ignore[arg-type]


def test_set_training_switches_only_what_matters_and_matches_train_eval() -> None:
    model = StreamMLP(3, 2, hidden=(4,), norm="ema_batch", dropout=0.5)
    model.set_training(False)
    assert not model.training and all(not m.training for m in model._mode_dependent)
    model.set_training(True)
    assert all(m.training for m in model._mode_dependent)
    x = torch.randn(6, 3)
    model.set_training(False)
    fast = model(x)
    model.eval()
    torch.testing.assert_close(model(x), fast, rtol=0, atol=0)


def test_output_growth_keeps_old_weights_adam_state_and_old_logits() -> None:
    model, opt = _trained(3)
    x = torch.randn(7, 5)
    model.eval()
    with torch.no_grad():
        old_logits = model(x)
    head = model.head
    old_w, old_b = head.weight.detach().clone(), head.bias.detach().clone()
    old_state = {k: v.clone() for k, v in opt.state[head.weight].items()}
    weight_param = head.weight
    assert model.grow(out_features=5, optimizer=opt)
    assert head.weight is weight_param  # same Parameter: the optimizer still references it
    assert head.weight.shape == (5, 6) and head.bias.shape == (5,)
    assert torch.equal(head.weight[:3], old_w) and torch.equal(head.bias[:3], old_b)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[head.weight][key][:3], old_state[key])
        assert torch.count_nonzero(opt.state[head.weight][key][3:]) == 0
    assert torch.equal(opt.state[head.weight]["step"], old_state["step"])
    with torch.no_grad():
        new_logits = model(x)
    # Same weights; only the matmul blocking of a wider output may change the last bit.
    torch.testing.assert_close(new_logits[:, :3], old_logits, rtol=1e-6, atol=1e-6)
    # Old classes' probabilities change only by the softmax renormalization.
    p_old, p_new = old_logits.softmax(1), new_logits.softmax(1)
    torch.testing.assert_close(p_new[:, :3] / p_new[:, :3].sum(1, keepdim=True), p_old)
    # The optimizer keeps working on the grown parameters.
    opt.zero_grad()
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([4, 0, 1, 2, 3, 4, 0])).backward()
    opt.step()


@pytest.mark.parametrize("norm", ["layer", "ema_batch", "batch_renorm"])
def test_input_growth_leaves_the_function_on_old_records_unchanged(norm: str) -> None:
    model, opt = _trained(2, norm=norm)
    model.eval()
    x = torch.randn(9, 5)
    with torch.no_grad():
        before = model(x)
    first = model.first_linear
    old_state = {k: v.clone() for k, v in opt.state[first.weight].items()}
    assert model.grow(in_features=8, optimizer=opt)
    assert model.in_features == 8
    with torch.no_grad():
        after = model(torch.cat([x, torch.zeros(9, 3)], dim=1))
        anything = model(torch.cat([x, torch.randn(9, 3)], dim=1))
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        anything, after, rtol=0, atol=0
    )  # zero weights: new columns have no effect yet
    assert torch.equal(opt.state[first.weight]["exp_avg"][:, :5], old_state["exp_avg"])
    assert not model.grow(in_features=8, optimizer=opt)  # nothing to do


def test_grow_linear_with_sgd_momentum_buffers() -> None:
    linear = nn.Linear(2, 2)
    opt = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    linear(torch.randn(3, 2)).sum().backward()
    opt.step()
    buf = opt.state[linear.weight]["momentum_buffer"].clone()
    grow_linear_(linear, in_features=3, out_features=4, optimizer=opt)
    assert opt.state[linear.weight]["momentum_buffer"].shape == (4, 3)
    assert torch.equal(opt.state[linear.weight]["momentum_buffer"][:2, :2], buf)


def test_skip_is_a_linear_shortcut_that_starts_at_zero_and_grows_with_the_model() -> None:
    torch.manual_seed(0)
    model = StreamMLP(4, 2, hidden=(8,), norm="layer", skip=True)
    plain = StreamMLP(4, 2, hidden=(8,), norm="layer")
    assert plain.skip is None and model.skip is not None and model.skip.bias is None
    assert torch.count_nonzero(model.skip.weight) == 0  # starts as the plain MLP
    assert model.mode_independent
    x = torch.randn(5, 4)
    with torch.no_grad():
        model.skip.weight.normal_()
        expected = model.head(model.body(x)) + x @ model.skip.weight.T
    torch.testing.assert_close(model(x), expected)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1])).backward()
    opt.step()
    skip_w = model.skip.weight
    old_w = skip_w.detach().clone()
    old_moment = opt.state[skip_w]["exp_avg"].clone()
    model.eval()
    with torch.no_grad():
        before = model(x)
    assert model.grow(in_features=6, out_features=3, optimizer=opt)
    assert model.skip.weight is skip_w and skip_w.shape == (3, 6) and model.skip.in_features == 6
    assert torch.equal(skip_w[:2, :4], old_w)
    assert torch.count_nonzero(skip_w[2:]) == 0 and torch.count_nonzero(skip_w[:, 4:]) == 0
    assert opt.state[skip_w]["exp_avg"].shape == (3, 6)
    assert torch.equal(opt.state[skip_w]["exp_avg"][:2, :4], old_moment)
    with torch.no_grad():
        after = model(torch.cat([x, torch.randn(5, 2)], dim=1))
    torch.testing.assert_close(after[:, :2], before, rtol=1e-6, atol=1e-6)
    assert not model.grow(in_features=6, out_features=3, optimizer=opt)
