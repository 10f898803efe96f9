r"""The compiled engine: ``K`` stacked members of one MLP architecture trained in the same calls.

**Shared memory, one source of truth.** :meth:`CompiledEngine.build` moves every parameter of
member ``k`` into row ``k`` of one ``(K, P)`` buffer (``p.data`` becomes a view of it, values
copied exactly), its Adam ``exp_avg``/``exp_avg_sq``/``step`` into buffers of the same layout (the
optimizer's state entries become views), its gradients into a ``(K, P)`` buffer (``p.grad`` views),
and every norm layer's ``running_mean``, ``running_var`` and ``samples_seen`` into stacked
buffers. The kernels (:mod:`stream_trainer.engine.kernels`) work on numpy views of those buffers,
so the PyTorch models, ``state_dict``, the optimizers and the checkpoints see every update, and a
PyTorch forward of a member computes what :meth:`CompiledEngine.serve` computes (to rounding).

**Covered** (else :meth:`CompiledEngine.build` returns ``None`` and the trainer takes the autograd
path): :class:`~stream_trainer.model.StreamMLP` of plain blocks (``Linear``, norm, activation; no
dropout, no weight standardization, no hooks or parametrizations) with norms ``ema_batch``,
``batch_renorm`` (single process: no moment reducer), ``layer`` or ``none`` on ``(N, C)``;
activations ``relu``, ``gelu`` (exact), ``tanh``, ``silu``; CPU float32 or float64 parameters of
one dtype; Adam or AdamW with one parameter group (no amsgrad, maximize, capturable or
differentiable), the same betas, eps and weight decay in every member. The buffers are laid out
once: after a member grows (new features or classes) the trainer builds the engine again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from stream_trainer.engine import kernels
from stream_trainer.norms import LayerNorm, NoNorm, StreamNorm
from stream_trainer.norms._moments import reducer_is_identity
from stream_trainer.norms.batch import BatchRenorm, EMABatchNorm

__all__ = ["ACTIVATION_CODES", "CompiledEngine", "plain_blocks"]

Array = np.ndarray

ACTIVATION_CODES: dict[type[nn.Module], int] = {nn.ReLU: 0, nn.GELU: 1, nn.Tanh: 2, nn.SiLU: 3}
_NORM_CODES: dict[type[StreamNorm], int] = {
    NoNorm: 0,
    EMABatchNorm: 1,
    BatchRenorm: 2,
    LayerNorm: 3,
}
_ADAM_KINDS = (torch.optim.Adam, torch.optim.AdamW)
_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def _plain(module: nn.Module) -> bool:
    """No parametrization, no hooks: the module's forward is what its parameters say."""
    return not (
        getattr(module, "parametrizations", None)
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
    )


def plain_blocks(model: nn.Module) -> list[tuple[nn.Linear, StreamNorm, nn.Module]] | None:
    """``(linear, norm, activation)`` per hidden block of a :class:`StreamMLP`, or ``None`` when
    the structure is not one the engine follows (module doc)."""
    body, head = getattr(model, "body", None), getattr(model, "head", None)
    if not isinstance(body, nn.Sequential) or type(head) is not nn.Linear:
        return None
    if not isinstance(getattr(model, "layout_version", None), int):
        return None
    skip = getattr(model, "skip", None)
    if skip is not None and type(skip) is not nn.Linear:
        return None
    modules = list(body)
    if len(modules) % 3:
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


def _norm_code(norm: StreamNorm) -> int | None:
    code = _NORM_CODES.get(type(norm))
    if code in (1, 2) and (
        not reducer_is_identity(norm.moment_reducer)
        or norm.running_mean is None
        or norm.running_var is None
        or norm.samples_seen is None
    ):
        return None
    return code


def _activation_code(act: nn.Module) -> int | None:
    if type(act) is nn.GELU and act.approximate != "none":
        return None
    return ACTIVATION_CODES.get(type(act))


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
    if any(not s or set(s) != {"step", "exp_avg", "exp_avg_sq"} for s in states):
        return False
    return len({float(s["step"]) for s in states if s}) == 1


def _hyper(optimizer: torch.optim.Optimizer) -> tuple[float, float, float, float, float]:
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    decoupled = bool(group.get("decoupled_weight_decay")) or type(optimizer) is torch.optim.AdamW
    return (
        float(beta1),
        float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
        float(decoupled),
    )


class _Layout:
    """Offsets of one architecture in the flat parameter vector and the statistics buffers."""

    def __init__(self, model: nn.Module, blocks: list[tuple[nn.Linear, StreamNorm, nn.Module]]):
        params = list(model.parameters())
        offsets: dict[int, int] = {}
        position = 0
        for p in params:
            offsets[id(p)] = position
            position += p.numel()
        self.size = position

        def off(t: torch.Tensor | None) -> int:
            return -1 if t is None else offsets[id(t)]

        head: nn.Linear = model.head  # type: ignore[assignment]
        skip: nn.Linear | None = getattr(model, "skip", None)
        linears = [linear for linear, _, _ in blocks] + [head]
        norms = [norm for _, norm, _ in blocks]
        ints = np.full((len(linears), 8), -1, dtype=np.int64)
        floats = np.zeros((len(norms), 6), dtype=np.float64)
        stats = 0
        for i, linear in enumerate(linears):
            ints[i, :4] = (
                linear.in_features,
                linear.out_features,
                off(linear.weight),
                off(linear.bias),
            )
        for i, norm in enumerate(norms):
            code = _norm_code(norm)
            assert code is not None
            ints[i, 4:] = (off(norm.weight), off(norm.bias), stats, code)
            stats += norm.num_features if code in (1, 2) else 0
            floats[i, :2] = (
                float(getattr(norm, "eps", 0.0)),
                float(getattr(norm, "warm_start", 0)),
            )
            if isinstance(norm, BatchRenorm):
                limits = (norm.rmax, norm.dmax, norm.warmup_start_samples, norm.warmup_end_samples)
                floats[i, 2:] = limits
        self.ints, self.floats, self.stats = ints, floats, stats
        self.layers = len(norms)
        self.skip_off = -1 if skip is None else off(skip.weight)
        self.n_tensors = len(params)

    def signature(self) -> tuple[Any, ...]:
        return (self.size, self.ints.tobytes(), self.floats.tobytes(), self.skip_off)


class CompiledEngine:
    """Serve and train ``K`` stacked members (module doc). Build with :meth:`build`; build again
    when :meth:`current` turns false (a member grew)."""

    def __init__(
        self,
        models: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        layout: _Layout,
        act: int,
        buffers: dict[str, torch.Tensor],
        norms: list[list[StreamNorm]],
    ) -> None:
        self.models, self.optimizers, self.layout, self.act = models, optimizers, layout, act
        self._tensors = buffers  # keeps the buffers alive
        self.params: Array = buffers["params"].numpy()
        self.grads: Array = buffers["grads"].numpy()
        self.exp_avg: Array = buffers["exp_avg"].numpy()
        self.exp_avg_sq: Array = buffers["exp_avg_sq"].numpy()
        self.steps: Array = buffers["steps"].numpy()
        self.run_mean: Array = buffers["run_mean"].numpy()
        self.run_var: Array = buffers["run_var"].numpy()
        self.seen: Array = buffers["seen"].numpy()
        self.members = len(models)
        self.dtype = self.params.dtype
        self.in_features = int(layout.ints[0, 0])
        self.out_features = int(layout.ints[-1, 1])
        self._losses = np.zeros(self.members)
        self._momentum = np.asarray(
            [[float(getattr(n, "momentum", 0.0)) for n in member] for member in norms],
            dtype=np.float64,
        ).reshape(self.members, layout.layers)
        # Growing a member gives its grown parameters new storage (loading a state dict copies
        # in place and keeps it): the members' layout versions now.
        self._versions = [(m, m.layout_version) for m in models]

    @classmethod
    def build(
        cls, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> CompiledEngine | None:
        """Lay the members' parameters, gradients, Adam state and norm statistics out in stacked
        buffers and return the engine, or ``None`` (nothing changed) where a member or optimizer
        is not covered or the members differ in architecture (module doc)."""
        if not models or len(models) != len(optimizers):
            return None
        layouts, all_norms, acts = [], [], set[int]()
        dtypes: set[torch.dtype] = set()
        for model, optimizer in zip(models, optimizers, strict=True):
            blocks = plain_blocks(model)
            if blocks is None:
                return None
            params = list(model.parameters())
            if any(not p.is_cpu for p in params) or not _adam_supported(optimizer, params):
                return None
            codes = [_activation_code(a) for _, _, a in blocks]
            if None in codes or len(set(codes)) > 1:
                return None
            acts.update(c for c in codes if c is not None)
            norms = [n for _, n, _ in blocks]
            if any(_norm_code(n) is None for n in norms):
                return None
            tensors = params + [b for n in norms for b in n.buffers() if b.is_floating_point()]
            dtypes.update(t.dtype for t in tensors)
            layouts.append(_Layout(model, blocks))
            all_norms.append(norms)
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            return None
        if len({layout.signature() for layout in layouts}) != 1:
            return None
        if len({_hyper(o) for o in optimizers}) != 1:
            return None
        buffers = _stack(models, optimizers, all_norms, layouts[0], next(iter(dtypes)))
        act = next(iter(acts)) if acts else 0
        return cls(list(models), list(optimizers), layouts[0], act, buffers, all_norms)

    def current(self) -> bool:
        """Whether every member still has the storage this engine laid out."""
        return all(m.layout_version == version for m, version in self._versions)

    def applies(self, x: Array) -> bool:
        """Whether ``x`` can take this engine: a non-empty 2-d array of the parameters' dtype and
        the members' input width."""
        return (
            x.ndim == 2
            and x.shape[0] > 0
            and x.dtype == self.dtype
            and (x.shape[1] == self.in_features)
        )

    def serve(self, x: Array) -> Array:
        """Eval-mode outputs of every member, ``(K, N, C)`` (logits, or standardized regression
        outputs); updates nothing."""
        lay = self.layout
        out = np.empty((self.members, x.shape[0], self.out_features), dtype=self.dtype)
        kernels.serve_step(
            np.ascontiguousarray(x), self.params, self.run_mean, self.run_var, lay.ints,
            lay.floats, self.act, lay.skip_off, out,
        )  # fmt: skip
        return out

    def learn(self, x: Array, target: Array, *, regression: bool, max_norm: float | None) -> Array:
        """One optimizer step of every member on the batch-mean loss (forward with statistics
        updated, backward, clipping to ``max_norm``, Adam); returns the members' losses ``(K,)``.

        ``target``: class indices for cross-entropy, or standardized targets ``(N, 1)`` for the
        squared error. Each member's learning rate and the shared betas are read from its
        optimizer's group at every step, so schedules set there apply unchanged."""
        lay = self.layout
        hyper = np.asarray(
            (*_hyper(self.optimizers[0]), -1.0 if max_norm is None else float(max_norm)),
            dtype=np.float64,
        )
        lr = np.asarray([o.param_groups[0]["lr"] for o in self.optimizers], dtype=np.float64)
        if regression:
            labels = np.zeros(1, dtype=np.int64)
            targets = np.ascontiguousarray(target, dtype=self.dtype).reshape(x.shape[0], -1)
        else:
            labels = np.ascontiguousarray(target, dtype=np.int64)
            targets = np.zeros((1, 1), dtype=self.dtype)
        kernels.learn_step(
            np.ascontiguousarray(x), labels, targets, regression, self.params, self.grads,
            self.exp_avg, self.exp_avg_sq, self.steps, self.run_mean, self.run_var, self.seen,
            lay.ints, lay.floats, self.act, lay.skip_off, self._momentum, lr, hyper, self._losses,
        )  # fmt: skip
        return self._losses.copy()


def _stack(
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    norms: list[list[StreamNorm]],
    layout: _Layout,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Move every member's parameters, gradients, Adam state and norm statistics into stacked
    buffers (values copied exactly; an empty Adam state starts at zero as Adam's would) and point
    the modules' tensors and the optimizers' state entries at views of them."""
    k_members = len(models)
    names = ("params", "grads", "exp_avg", "exp_avg_sq")
    flat = {k: torch.zeros(k_members, layout.size, dtype=dtype) for k in names}
    flat["steps"] = torch.zeros(k_members, layout.n_tensors, dtype=torch.float32)
    flat["run_mean"] = torch.zeros(k_members, max(1, layout.stats), dtype=dtype)
    flat["run_var"] = torch.ones(k_members, max(1, layout.stats), dtype=dtype)
    flat["seen"] = torch.zeros(k_members, max(1, layout.layers), dtype=torch.long)
    with torch.no_grad():
        for k, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            offset = 0
            for i, p in enumerate(model.parameters()):
                size, shape = p.numel(), p.shape
                views = {n: flat[n][k, offset : offset + size].view(shape) for n in names}
                views["params"].copy_(p.data)
                p.data = views["params"]
                p.grad = views["grads"]
                state = optimizer.state[p]
                if state:
                    views["exp_avg"].copy_(state["exp_avg"])
                    views["exp_avg_sq"].copy_(state["exp_avg_sq"])
                    flat["steps"][k, i] = float(state["step"])
                state["exp_avg"], state["exp_avg_sq"] = views["exp_avg"], views["exp_avg_sq"]
                state["step"] = flat["steps"][k, i]
                offset += size
            for layer_index, norm in enumerate(norms[k]):
                if layout.ints[layer_index, 7] not in (1, 2):
                    continue
                start = int(layout.ints[layer_index, 6])
                width = norm.num_features
                pairs = (("run_mean", norm.running_mean), ("run_var", norm.running_var))
                for name, buffer in pairs:
                    assert isinstance(buffer, torch.Tensor)
                    view = flat[name][k, start : start + width]
                    view.copy_(buffer)
                    buffer.data = view
                seen = norm.samples_seen
                assert isinstance(seen, torch.Tensor)
                flat["seen"][k, layer_index] = seen
                seen.data = flat["seen"][k, layer_index]
    return flat
