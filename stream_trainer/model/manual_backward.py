r"""A hand-differentiated training step for :class:`~stream_trainer.model.StreamMLP`.

At the trainer's common batch sizes (1 to a few dozen rows, 64 hidden units) a training step
costs the number of tensor ops and of Python calls, not arithmetic: autograd records every op of
the forward pass, builds a graph and walks it in its engine, and the module calls add their own
bookkeeping. Here the training forward runs with autograd off, keeping what the backward needs (a
*tape*), and the backward is written out layer by layer, with the same kernels autograd would call.
What it saves is autograd's graph, not kernels, so it pays most at batches of a few dozen rows;
at batch size 1 the small kernels themselves dominate (``python bench/bench_step_paths.py``).

For hidden blocks ``h_{k+1} = \phi(\mathrm{Norm}_k(W_k h_k + b_k))`` and the head
``o = W_o h_K + b_o (+ W_s x)``, with :math:`g = \partial L/\partial o`:

.. math::

    \frac{\partial L}{\partial W_o} = g^\top h_K,\quad
    \frac{\partial L}{\partial b_o} = \textstyle\sum_i g_i,\quad
    \frac{\partial L}{\partial W_s} = g^\top x,\quad
    \frac{\partial L}{\partial h_K} = g W_o,

then, going down, :math:`\partial L/\partial z_k = \phi'(\cdot) \odot \partial L/\partial
h_{k+1}` through the activation (``relu``, ``gelu``, ``tanh``, ``silu``: their aten backward
kernels), the norm layer's own backward (:meth:`~stream_trainer.norms.StreamNorm.manual_forward`:
the fused ``ema_batch`` / ``batch_renorm`` backward, layer norm's kernel, the identity), and the
linear layer as for the head. The losses and their gradients are :func:`cross_entropy_with_grad`
(mean over rows) and :func:`mse_with_grad` (mean over elements), as ``torch.nn.functional``
defines them.

The gradients equal autograd's to float rounding (``tests/test_manual_backward.py`` holds them
together for every supported norm and activation, batch sizes 1 to 64, and over whole trainer
runs); the running statistics of the norm layers are updated by the very same code. Not covered,
hence differentiated by autograd as before (:func:`ManualMLP.build` returns ``None`` or
:meth:`ManualMLP.applies` is false): dropout, weight-standardized linear layers, norms without a
manual forward (``batch``, ``group``, ``rms``, ``online``, plug-ins), a norm whose fused path does
not apply (a distributed moment reducer, ``fused = False``), non-CPU or non-float32/64 tensors,
parametrized modules.

Where it covers the model, the trainer runs :mod:`stream_trainer.model.numpy_step` instead (the
same formulas in numpy, cheaper again at small batches); this module serves what that one does not
cover (distributed training, SGD, ``trainer.numpy_step = False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream_trainer.norms import StreamNorm
from stream_trainer.norms.base import ManualBackward

__all__ = [
    "ManualMLP",
    "ManualTape",
    "cross_entropy_with_grad",
    "mse_with_grad",
    "plain_mlp_blocks",
]

Activation = Callable[[Tensor], Tensor]
ActivationBackward = Callable[[Tensor, Tensor, Tensor], Tensor]  # (dy, input, output) -> dx


def _activation(module: nn.Module) -> tuple[Activation, ActivationBackward] | None:
    """Forward and backward of a supported activation module, else ``None``."""
    kind = type(module)
    if kind is nn.ReLU:
        return torch.relu, lambda dy, x, y: torch.ops.aten.threshold_backward(dy, y, 0)
    if isinstance(module, nn.GELU) and kind is nn.GELU:
        approximate = module.approximate

        def gelu(x: Tensor) -> Tensor:
            return F.gelu(x, approximate=approximate)

        def gelu_backward(dy: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return torch.ops.aten.gelu_backward(dy, x, approximate=approximate)

        return gelu, gelu_backward
    if kind is nn.Tanh:
        return torch.tanh, lambda dy, x, y: torch.ops.aten.tanh_backward(dy, y)
    if kind is nn.SiLU:
        return F.silu, lambda dy, x, y: torch.ops.aten.silu_backward(dy, x)
    return None


class _Block:
    """One hidden block ``Linear -> StreamNorm -> activation``."""

    __slots__ = ("act", "act_backward", "linear", "norm")

    def __init__(
        self, linear: nn.Linear, norm: StreamNorm, act: Activation, act_backward: ActivationBackward
    ) -> None:
        self.linear, self.norm, self.act, self.act_backward = linear, norm, act, act_backward


class ManualTape:
    """What :meth:`ManualMLP.backward` needs from one training forward: the input of every
    linear layer, each norm's backward, each activation's input and output."""

    __slots__ = ("blocks", "x")

    def __init__(self, x: Tensor) -> None:
        self.x = x
        # per block: (linear input, norm backward, activation input, activation output)
        self.blocks: list[tuple[Tensor, ManualBackward, Tensor, Tensor]] = []


def _plain(module: nn.Module) -> bool:
    """No parametrization, no hooks: the module's forward is what its parameters say."""
    return not (
        getattr(module, "parametrizations", None)
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
    )


def plain_mlp_blocks(model: nn.Module) -> list[tuple[nn.Linear, StreamNorm, nn.Module]] | None:
    """``(linear, norm, activation)`` per hidden block of a :class:`StreamMLP`, or ``None`` when
    the structure is not a plain one a hand-written step can follow: a layer other than a plain
    ``Linear``, a ``StreamNorm`` and an activation per block (no dropout, no weight
    standardization), a head or skip other than plain ``Linear``, parametrized or hooked modules,
    frozen parameters."""
    body = getattr(model, "body", None)
    head = getattr(model, "head", None)
    if not isinstance(body, nn.Sequential) or type(head) is not nn.Linear:
        return None
    skip = getattr(model, "skip", None)
    if skip is not None and type(skip) is not nn.Linear:
        return None
    modules = list(body)
    if len(modules) % 3 or any(isinstance(m, nn.Dropout) for m in modules):
        return None
    blocks = []
    for i in range(0, len(modules), 3):
        linear, norm, act = modules[i : i + 3]
        if type(linear) is not nn.Linear or not isinstance(norm, StreamNorm):
            return None
        blocks.append((linear, norm, act))
    if not all(_plain(m) for m in model.modules()):
        return None
    if any(not p.requires_grad for p in model.parameters()):
        return None
    return blocks


class ManualMLP:
    """Training forward and hand-written backward of one :class:`StreamMLP` (module doc).

    Parameters are read from the modules at every call, so growth of the input or output width
    (which swaps ``.data``) needs nothing here.
    """

    def __init__(self, model: nn.Module, blocks: list[_Block]) -> None:
        self.model = model
        self.blocks = blocks
        self.head: nn.Linear = model.head  # type: ignore[assignment]
        self.skip: nn.Linear | None = model.skip  # type: ignore[assignment]
        self.params: list[nn.Parameter] = list(model.parameters())

    @classmethod
    def build(cls, model: nn.Module) -> ManualMLP | None:
        """The manual step for ``model``, or ``None`` when its structure is not covered
        (:func:`plain_mlp_blocks`)."""
        found = plain_mlp_blocks(model)
        if found is None:
            return None
        blocks = []
        for linear, norm, act in found:
            pair = _activation(act)
            if pair is None:
                return None
            blocks.append(_Block(linear, norm, *pair))
        return cls(model, blocks)

    def applies(self, x: Tensor) -> bool:
        """Whether this input can take the manual path: a CPU float32/float64 tensor of the
        parameters' dtype, and every norm layer has its manual forward for it."""
        if not x.is_cpu or x.dtype not in (torch.float32, torch.float64) or x.shape[0] == 0:
            return False
        if any(p.dtype != x.dtype or not p.is_cpu for p in self.params):
            return False
        rows = x.shape[0]
        return all(
            block.norm.manual_forward_applies(x.new_empty((rows, block.linear.out_features)))
            for block in self.blocks
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ManualTape]:
        """The training-mode forward (norm statistics updated as by ``model(x)`` in training
        mode), with autograd off; returns the output and the tape for :meth:`backward`."""
        tape = ManualTape(x)
        h = x
        with torch.no_grad():
            for block in self.blocks:
                lin = block.linear
                z = F.linear(h, lin.weight, lin.bias)
                n, norm_backward = block.norm.manual_forward(z)
                a = block.act(n)
                tape.blocks.append((h, norm_backward, n, a))
                h = a
            out = F.linear(h, self.head.weight, self.head.bias)
            if self.skip is not None:
                out = out.add_(F.linear(x, self.skip.weight))
        return out, tape

    def backward(self, tape: ManualTape, dout: Tensor) -> None:
        """Set ``p.grad`` of every parameter from ``dout = dL/d(output)`` (replacing any previous
        gradient, as ``zero_grad(set_to_none=True)`` + ``backward()`` would)."""
        with torch.no_grad():
            grads: dict[Tensor, Tensor | None] = {}
            if self.skip is not None:
                grads[self.skip.weight] = dout.t().mm(tape.x)
            last = tape.blocks[-1][3] if tape.blocks else tape.x
            dh = self._linear_backward(self.head, dout, last, grads, need_input=bool(tape.blocks))
            for block, (h_in, norm_backward, n, a) in zip(
                reversed(self.blocks), reversed(tape.blocks), strict=True
            ):
                assert dh is not None
                dn = block.act_backward(dh, n, a)
                dz, gw, gb = norm_backward(dn)
                norm = block.norm
                if norm.weight is not None:
                    grads[norm.weight] = gw
                if norm.bias is not None:
                    grads[norm.bias] = gb
                assert dz is not None
                dh = self._linear_backward(
                    block.linear, dz, h_in, grads, need_input=block is not self.blocks[0]
                )
            for p in self.params:
                p.grad = grads.get(p)

    @staticmethod
    def _linear_backward(
        linear: nn.Linear,
        dy: Tensor,
        x: Tensor,
        grads: dict[Tensor, Tensor | None],
        *,
        need_input: bool,
    ) -> Tensor | None:
        grads[linear.weight] = dy.t().mm(x)
        if linear.bias is not None:
            grads[linear.bias] = dy.sum(0)
        return dy.mm(linear.weight) if need_input else None


def cross_entropy_with_grad(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    r"""``F.cross_entropy(logits, target)`` (mean over rows) and its gradient in ``logits``,
    :math:`(\mathrm{softmax}(o) - \mathrm{onehot}(y)) / N`."""
    with torch.no_grad():
        logp = torch.log_softmax(logits, dim=1)
        rows = torch.arange(logits.shape[0])
        loss = -logp[rows, target].mean()
        grad = logp.exp_()
        grad[rows, target] -= 1.0
        grad.div_(logits.shape[0])
    return loss, grad


def mse_with_grad(out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    r"""``F.mse_loss(out, target)`` (mean over elements) and its gradient,
    :math:`2 (o - z) / \mathrm{numel}`."""
    with torch.no_grad():
        diff = out - target
        loss = diff.pow(2).mean()
        grad = diff.mul_(2.0 / diff.numel())
    return loss, grad
