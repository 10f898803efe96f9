r"""The prequential step of the default MLP in numpy: serving forward, training forward, backward,
gradient clipping and Adam, on arrays that share memory with the PyTorch model and optimizer.

**Why.** At batch size 1 a step is a few hundred operations on vectors of 64 values, so its cost
is the fixed cost of each operation, not arithmetic, and a PyTorch call pays dispatch overhead that
a numpy call on a small array mostly does not. The hand-differentiated PyTorch step
(:mod:`stream_trainer.model.manual_backward`) removes autograd's graph but not those per-call
costs; this step removes them (``python bench/bench_step_paths.py``, BENCHMARKS.md).

**Shared memory, one source of truth.** :meth:`NumpyMLPStep.build` moves every parameter into one
flat buffer (``p.data`` becomes a view of it, values copied exactly), and Adam's ``exp_avg``,
``exp_avg_sq`` and ``step`` into flat buffers of the same layout (the optimizer's state entries
become views), and gives each parameter a ``.grad`` view of one flat gradient buffer. The numpy
arrays are views of those same buffers, and the norm layers' kernels
(:mod:`stream_trainer.norms._numpy`) views of the layers' running statistics. So the PyTorch
model, ``state_dict``, the optimizer state and the checkpoints see every update at once, and a
PyTorch forward of the model computes what this step's :meth:`~NumpyMLPStep.serve` computes (to
float rounding). Adam and gradient clipping then run once over the whole flat buffer instead of
once per tensor.

**Math.** The forward and the backward are those of :mod:`stream_trainer.model.manual_backward`
(the same layer-by-layer formulas); the losses are the batch-mean cross-entropy on the logits and
the mean squared error; clipping scales every gradient by :math:`\min(1, c / (\lVert g\rVert_2 +
10^{-6}))` as ``torch.nn.utils.clip_grad_norm_``; Adam (and AdamW, decoupled weight decay) is the
update of PyTorch's fused kernel, with :math:`t` the step count after the increment:

.. math::

    m \leftarrow m + (1 - \beta_1)(g - m), \quad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

(Adam adds :math:`\lambda\theta` to :math:`g` first; AdamW multiplies :math:`\theta` by
:math:`1 - \eta\lambda` first). ``lr``, ``betas``, ``eps`` and ``weight_decay`` are read from the
optimizer's parameter group at every step, so the trainer's learning-rate schedule and
sample-counted :math:`\beta_1` apply unchanged. Results equal the PyTorch path's to float
rounding, not bit for bit (``tests/test_numpy_step.py`` holds outputs, gradients, running
statistics, optimizer state and whole prequential runs together).

**Covered** (else :meth:`NumpyMLPStep.build` returns ``None`` and the trainer uses the PyTorch
paths): the plain MLP structure of :func:`~stream_trainer.model.manual_backward.plain_mlp_blocks`
(no dropout, no weight standardization); norms with a numpy kernel (``ema_batch``,
``batch_renorm``, ``layer``, ``none``); activations ``relu``, ``gelu`` (exact, erf), ``tanh``,
``silu``; CPU float32 or float64 parameters of one dtype; Adam or AdamW with one parameter group
(no amsgrad, maximize, capturable or differentiable); a single process (the trainer does not use it
with distributed hooks). The buffers are laid out once: after the model grows (new features or
classes) the trainer builds the step again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import erf, expit
from torch import nn

from stream_trainer.model.manual_backward import plain_mlp_blocks
from stream_trainer.norms._numpy import NumpyNormKernel, column_sum

__all__ = ["NumpyMLPStep", "softmax64"]

Array = np.ndarray
_Forward = Callable[[Array], Array]
_Backward = Callable[[Array, Array, Array], Array]  # (dy, input, output) -> dx

_SQRT1_2 = math.sqrt(0.5)
_PDF_SCALE = 1.0 / math.sqrt(2.0 * math.pi)


def _relu(z: Array) -> Array:
    return np.maximum(z, 0.0)


def _relu_backward(dy: Array, z: Array, a: Array) -> Array:
    return np.where(a > 0.0, dy, 0.0).astype(dy.dtype, copy=False)


# From this many elements on, GELU and SiLU run PyTorch's vectorized kernels on zero-copy views:
# scipy's erf costs per element, PyTorch's kernel about the same per call whatever the size
# (``python bench/bench_step_paths.py`` times both).
_TORCH_ELEMENTWISE = 4096


def _gelu(z: Array) -> Array:
    r""":math:`z\,\Phi(z) = \tfrac12 z (1 + \operatorname{erf}(z/\sqrt2))` (``F.gelu``, exact)."""
    if z.size >= _TORCH_ELEMENTWISE:
        return F.gelu(torch.from_numpy(z)).numpy()
    cdf = erf(z * _SQRT1_2)
    cdf += 1.0
    cdf *= 0.5
    cdf *= z
    return cdf


def _gelu_backward(dy: Array, z: Array, a: Array) -> Array:
    r""":math:`g\,(\Phi(z) + z\,\varphi(z))`."""
    if z.size >= _TORCH_ELEMENTWISE:
        return torch.ops.aten.gelu_backward(torch.from_numpy(dy), torch.from_numpy(z)).numpy()
    cdf = erf(z * _SQRT1_2)
    cdf += 1.0
    cdf *= 0.5
    pdf = np.exp(z * z * -0.5)
    pdf *= z
    pdf *= _PDF_SCALE
    cdf += pdf
    cdf *= dy
    return cdf


def _tanh_backward(dy: Array, z: Array, a: Array) -> Array:
    return dy * (1.0 - a * a)


def _silu(z: Array) -> Array:
    if z.size >= _TORCH_ELEMENTWISE:
        return F.silu(torch.from_numpy(z)).numpy()
    return z * expit(z)


def _silu_backward(dy: Array, z: Array, a: Array) -> Array:
    r""":math:`g\,s(1 + z(1 - s))`, :math:`s = \sigma(z)`."""
    if z.size >= _TORCH_ELEMENTWISE:
        return torch.ops.aten.silu_backward(torch.from_numpy(dy), torch.from_numpy(z)).numpy()
    s = expit(z)
    out = 1.0 - s
    out *= z
    out += 1.0
    out *= s
    out *= dy
    return out


def _activation(module: nn.Module) -> tuple[_Forward, _Backward] | None:
    kind = type(module)
    if kind is nn.ReLU:
        return _relu, _relu_backward
    if kind is nn.GELU and module.approximate == "none":
        return _gelu, _gelu_backward
    if kind is nn.Tanh:
        return np.tanh, _tanh_backward
    if kind is nn.SiLU:
        return _silu, _silu_backward
    return None


def softmax64(logits: Array) -> Array:
    """Row-wise softmax in float64 (what ``torch.softmax(out.double(), 1)`` computes)."""
    out = logits.astype(np.float64)
    out -= out.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


class _Linear:
    """Numpy views of one linear layer's weight (and its transpose), bias and gradients."""

    __slots__ = ("bias", "grad_bias", "grad_weight", "weight", "weight_t")

    def __init__(self, linear: nn.Linear) -> None:
        self.weight: Array = linear.weight.detach().numpy()
        self.weight_t: Array = self.weight.T
        self.bias: Array | None = None if linear.bias is None else linear.bias.detach().numpy()
        assert linear.weight.grad is not None
        self.grad_weight: Array = linear.weight.grad.numpy()
        self.grad_bias: Array | None = None
        if linear.bias is not None:
            assert linear.bias.grad is not None
            self.grad_bias = linear.bias.grad.numpy()

    def forward(self, x: Array) -> Array:
        y = x @ self.weight_t
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy: Array, x: Array, need_x: bool) -> Array | None:
        np.matmul(dy.T, x, out=self.grad_weight)
        if self.grad_bias is not None:
            column_sum(dy, self.grad_bias)
        return dy @ self.weight if need_x else None


def _grad_view(param: torch.Tensor | None) -> Array | None:
    return None if param is None or param.grad is None else param.grad.numpy()


class _Block:
    __slots__ = ("act", "act_backward", "linear", "norm")

    def __init__(self, linear: _Linear, norm: NumpyNormKernel, act: _Forward, back: _Backward):
        self.linear, self.norm, self.act, self.act_backward = linear, norm, act, back


_ADAM_KINDS = (torch.optim.Adam, torch.optim.AdamW)
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _adam_supported(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
    if type(optimizer) not in _ADAM_KINDS or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if any(group.get(flag) for flag in _UNSUPPORTED_FLAGS):
        return False
    if [id(p) for p in group["params"]] != [id(p) for p in params]:
        return False
    states = [optimizer.state.get(p) for p in params]
    if all(not s for s in states):
        return True
    keys = {"step", "exp_avg", "exp_avg_sq"}
    if any(not s or set(s) != keys for s in states):
        return False
    steps = {float(s["step"]) for s in states if s}
    return len(steps) == 1


class NumpyMLPStep:
    """Serve and learn one batch of a plain :class:`~stream_trainer.model.StreamMLP` in numpy
    (module doc). Build with :meth:`build`; rebuild after the model grows."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        blocks: list[_Block],
        flat: dict[str, torch.Tensor],
    ) -> None:
        self.model, self.optimizer, self.blocks = model, optimizer, blocks
        self._tensors = flat  # keeps the flat buffers alive
        self.params: Array = flat["params"].numpy()
        self.grads: Array = flat["grads"].numpy()
        self.exp_avg: Array = flat["exp_avg"].numpy()
        self.exp_avg_sq: Array = flat["exp_avg_sq"].numpy()
        self.steps: Array = flat["steps"].numpy()
        self._scratch = np.empty_like(self.params)
        self.dtype = self.params.dtype
        head: nn.Linear = getattr(model, "head")  # noqa: B009 (typed as a Linear)
        skip: nn.Linear | None = getattr(model, "skip", None)
        self.head = _Linear(head)
        self.skip = None if skip is None else _Linear(skip)
        self.decoupled = bool(optimizer.param_groups[0].get("decoupled_weight_decay")) or (
            type(optimizer) is torch.optim.AdamW
        )
        # Growing a layer gives its weight new storage: the layers that can grow, and where
        # their weights live now.
        first: nn.Linear = getattr(model, "first_linear")  # noqa: B009
        grown = [first.weight, head.weight]
        if skip is not None:
            grown.append(skip.weight)
        self._layout = [(p, p.data_ptr()) for p in grown]

    @classmethod
    def build(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> NumpyMLPStep | None:
        """Lay the model's parameters, gradients and Adam state out in flat buffers and return
        the step, or ``None`` (nothing changed) where the model or optimizer is not covered."""
        found = plain_mlp_blocks(model)
        if found is None:
            return None
        params = list(model.parameters())
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float64):
            return None
        if any(not p.is_cpu for p in params) or not _adam_supported(optimizer, params):
            return None
        acts = [_activation(act) for _, _, act in found]
        if any(a is None for a in acts):
            return None
        if any(norm.numpy_kernel(None, None) is None for _, norm, _ in found):
            return None
        flat = _flatten(params, optimizer)
        blocks = []
        for (linear, norm, _), act in zip(found, acts, strict=True):
            assert act is not None
            kernel = norm.numpy_kernel(_grad_view(norm.weight), _grad_view(norm.bias))
            assert kernel is not None
            blocks.append(_Block(_Linear(linear), kernel, *act))
        return cls(model, optimizer, blocks, flat)

    def current(self) -> bool:
        """Whether the model still has the layout this step was built for: the weights of the
        layers that can grow (first layer, head, skip) still live in the flat buffer (growing a
        layer gives its parameters new storage)."""
        return all(p.data_ptr() == ptr for p, ptr in self._layout)

    def applies(self, x: Array) -> bool:
        """Whether ``x`` can take this step: a non-empty 2-d array of the parameters' dtype and
        the model's input width."""
        return (
            x.ndim == 2
            and x.shape[0] > 0
            and x.dtype == self.dtype
            and x.shape[1] == self.blocks[0].linear.weight.shape[1]
        )

    # ------------------------------------------------------------------ forward
    def serve(self, x: Array) -> Array:
        """Eval-mode output (logits, or the standardized regression output); updates nothing."""
        h = x
        for block in self.blocks:
            h = block.act(block.norm.serve(block.linear.forward(h)))
        out = self.head.forward(h)
        if self.skip is not None:
            out += x @ self.skip.weight_t
        return out

    def learn(self, x: Array, target: Array, *, regression: bool, max_norm: float | None) -> float:
        """One optimizer step on the batch mean loss: training forward (running statistics
        updated), backward, clipping to ``max_norm``, Adam. Returns the loss.

        ``target``: class indices (int64) for cross-entropy, or standardized targets ``(N, 1)``
        of the parameters' dtype for the squared error."""
        tape = []
        h = x
        for block in self.blocks:
            z = block.linear.forward(h)
            n, norm_tape = block.norm.train(z)
            a = block.act(n)
            tape.append((h, norm_tape, n, a))
            h = a
        out = self.head.forward(h)
        if self.skip is not None:
            out += x @ self.skip.weight_t
        loss, dout = _mse(out, target) if regression else _cross_entropy(out, target)
        if self.skip is not None:
            self.skip.backward(dout, x, need_x=False)
        dh = self.head.backward(dout, h, need_x=bool(self.blocks))
        for i in range(len(self.blocks) - 1, -1, -1):
            block = self.blocks[i]
            h_in, norm_tape, n, a = tape[i]
            assert dh is not None
            dn = block.act_backward(dh, n, a)
            dz = block.norm.backward(norm_tape, dn, True)
            assert dz is not None
            dh = block.linear.backward(dz, h_in, need_x=i > 0)
        if max_norm is not None:
            total = math.sqrt(float(np.dot(self.grads, self.grads)))
            coef = max_norm / (total + 1e-6)
            if coef < 1.0:
                self.grads *= coef
        self._adam()
        return loss

    def _adam(self) -> None:
        group = self.optimizer.param_groups[0]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        self.steps += 1.0
        step = float(self.steps[0])
        p, g, m, v, tmp = self.params, self.grads, self.exp_avg, self.exp_avg_sq, self._scratch
        if wd != 0.0:
            if self.decoupled:
                p *= 1.0 - lr * wd
            else:
                g = g + p * wd
        np.subtract(g, m, out=tmp)
        tmp *= 1.0 - beta1
        m += tmp
        v *= beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - beta2
        v += tmp
        step_size = lr / (1.0 - beta1**step)
        np.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(1.0 - beta2**step)
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


def _cross_entropy(logits: Array, target: Array) -> tuple[float, Array]:
    r"""Batch-mean cross-entropy and its gradient :math:`(\mathrm{softmax}(o) -
    \mathrm{onehot}(y)) / N`."""
    rows = logits.shape[0]
    if rows == 1:  # scalars in Python: cheaper than indexing arrays
        label = int(target[0])
        shifted = logits - np.maximum.reduce(logits, axis=1)
        exp = np.exp(shifted)
        norm = float(np.add.reduce(exp, axis=1)[0])
        exp *= 1.0 / norm
        exp[0, label] -= 1.0
        return math.log(norm) - float(shifted[0, label]), exp
    index = np.arange(rows)
    shifted = logits - np.maximum.reduce(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = np.add.reduce(exp, axis=1, keepdims=True)
    loss = float(np.add.reduce(np.log(total[:, 0]) - shifted[index, target])) / rows
    exp /= total
    exp[index, target] -= 1.0
    exp *= 1.0 / rows
    return loss, exp


def _mse(out: Array, target: Array) -> tuple[float, Array]:
    r"""Mean squared error over all elements and its gradient :math:`2(o - z)/\mathrm{numel}`."""
    diff = out - target
    loss = float(np.mean(diff * diff))
    diff *= 2.0 / diff.size
    return loss, diff


def _flatten(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Move the parameters, their gradients and their Adam state into flat buffers (values
    copied exactly; an empty state starts at zero as Adam's would) and point the parameters and
    the optimizer's state entries at views of them."""
    dtype = params[0].dtype
    total = sum(p.numel() for p in params)
    names = ("params", "grads", "exp_avg", "exp_avg_sq")
    flat = {k: torch.zeros(total, dtype=dtype) for k in names}
    steps = torch.zeros(len(params), dtype=torch.float32)  # fused Adam keeps float32 steps
    flat["steps"] = steps
    offset = 0
    with torch.no_grad():
        for i, p in enumerate(params):
            size, shape = p.numel(), p.shape
            views = {k: flat[k][offset : offset + size].view(shape) for k in names}
            views["params"].copy_(p.data)
            p.data = views["params"]
            p.grad = views["grads"]
            state = optimizer.state[p]
            if state:
                views["exp_avg"].copy_(state["exp_avg"])
                views["exp_avg_sq"].copy_(state["exp_avg_sq"])
                steps[i] = float(state["step"])
            state["exp_avg"], state["exp_avg_sq"] = views["exp_avg"], views["exp_avg_sq"]
            state["step"] = steps[i]
            offset += size
    return flat
