"""The served model of a trainer as one self-contained ``nn.Module``, and its TorchScript export.

:func:`served_module` freezes what :meth:`IncrementalTrainer.predict_proba_many` /
:meth:`~IncrementalTrainer.predict_many` compute for records that pass the checks, from the
encoder's *input columns* on:

1. the input is one row per record, one column per encoder column (:func:`input_columns`, in
   order): a numeric feature's raw value (NaN when missing), or a category's indicator (1.0 when
   the record has that value, else 0.0; a value the model never saw sets its feature's
   ``<other>`` column when there is one, else none);
2. numeric columns are standardized with the running statistics, in float64:
   :math:`z = \\mathrm{clip}((x - \\mu) / \\sigma, -c, c)`, a missing value :math:`z = 0`
   (:class:`~stream_trainer.features.RunningStandardizer`); then cast to float32;
3. each MLP member :math:`f_k` in serving mode (eval: running statistics, no dropout);
4. classification: :math:`p = \\sum_k w_k\\,\\mathrm{softmax}(f_k(x)) + w_L\\,
   \\mathrm{softmax}(Wx + b)` with the linear expert and the mixture weights :math:`w` of the
   moment of export (one member without a linear expert: :math:`p = \\mathrm{softmax}(f(x))`);
   regression: :math:`\\hat y = (\\sum_k w_k f_k(x) + w_L (Wx + b))\\,\\sigma_y + \\mu_y`, in
   float64 (:mod:`stream_trainer.training.mixture`).

The output is ``(N, n_classes)`` probabilities, or ``(N,)`` values. Everything is a constant of
the export: the module does not learn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn

from stream_trainer import __version__
from stream_trainer.errors import ConfigError
from stream_trainer.features.encoder import OTHER_CATEGORY
from stream_trainer.training.trainer import IncrementalTrainer

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ServedModel",
    "export_torchscript",
    "input_columns",
    "input_rows",
    "served_module",
]

EXPORT_FORMAT_VERSION: Final = 1
"""Version of the sidecar's layout (``metadata["format_version"]``)."""


class ServedModel(nn.Module):
    """Input columns -> served output (module docstring); built by :func:`served_module`."""

    numeric_columns: Tensor
    mean: Tensor
    std: Tensor
    expert_weight: Tensor
    expert_bias: Tensor

    def __init__(
        self,
        mlps: Sequence[nn.Module],
        *,
        n_columns: int,
        numeric_columns: list[int],
        mean: Tensor,
        std: Tensor,
        clip: float,
        model_in: int,
        regression: bool,
        expert: tuple[Tensor, Tensor] | None,
        weights: list[float],
        y_mean: float,
        y_std: float,
    ) -> None:
        """``weights``: one per member, then the linear expert's (with one)."""
        super().__init__()
        self.mlps = nn.ModuleList(mlps)
        self.n_columns = n_columns
        self.register_buffer("numeric_columns", torch.tensor(numeric_columns, dtype=torch.long))
        self.register_buffer("mean", mean.to(torch.float64))
        self.register_buffer("std", std.to(torch.float64))
        self.clip = float(clip)
        self.model_in = model_in
        self.regression = regression
        self.has_expert = expert is not None
        weight, bias = expert if expert is not None else (torch.zeros(0, 0), torch.zeros(0))
        self.register_buffer("expert_weight", weight.to(torch.float64))
        self.register_buffer("expert_bias", bias.to(torch.float64))
        self.w_members = [float(w) for w in weights[: len(mlps)]]
        self.w_linear = float(weights[len(mlps)]) if expert is not None else 0.0
        self.y_mean, self.y_std = float(y_mean), float(y_std)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        num = x.index_select(1, self.numeric_columns)
        z = (num - self.mean) / self.std
        z = torch.nan_to_num(z, nan=0.0).clamp(-self.clip, self.clip)
        encoded = x.index_copy(1, self.numeric_columns, z).to(torch.float32)
        if self.n_columns >= self.model_in:
            inputs = encoded[:, : self.model_in]
        else:  # columns the model has not grown to yet read as zeros
            inputs = nn.functional.pad(encoded, (0, self.model_in - self.n_columns))
        outs = [mlp(inputs).to(torch.float64) for mlp in self.mlps]
        parts = [out[:, :1] if self.regression else torch.softmax(out, dim=1) for out in outs]
        if self.has_expert:
            d = min(self.expert_weight.shape[1], inputs.shape[1])
            expert_out = inputs[:, :d].to(torch.float64) @ self.expert_weight[:, :d].T
            expert_out = expert_out + self.expert_bias
            parts.append(expert_out if self.regression else torch.softmax(expert_out, dim=1))
        if len(parts) == 1:
            served = parts[0]
        else:
            weights = [*self.w_members, self.w_linear] if self.has_expert else self.w_members
            served = parts[0] * weights[0]
            for part, weight in zip(parts[1:], weights[1:], strict=True):
                served = served + part * weight
        if self.regression:
            return served[:, 0] * self.y_std + self.y_mean
        return served


def input_columns(trainer: IncrementalTrainer) -> list[dict[str, str]]:
    """The exported model's input columns in order: ``{"name", "kind": "numeric"}`` or
    ``{"name", "kind": "category", "value"}`` (``value`` may be ``"<other>"``: any value
    without a column of its own)."""
    encoder = trainer.encoder
    columns: list[dict[str, str]] = [{}] * encoder.n_columns
    for name, slot in encoder.numeric.items():
        columns[encoder.numeric_columns[slot]] = {"name": name, "kind": "numeric"}
    for name, categories in encoder.categories.items():
        for value, j in categories.items():
            columns[j] = {"name": name, "kind": "category", "value": value}
    return columns


def input_rows(
    columns: Sequence[Mapping[str, str]], records: Sequence[Mapping[str, Any]]
) -> Tensor:
    """The exported model's input for flat ``records``, given the metadata's ``input_columns``:
    a numeric feature's value (NaN when missing, booleans as 0/1), a category's indicator, and a
    value without a column of its own on its feature's ``<other>`` column when there is one."""
    known: dict[str, set[str]] = {}
    for column in columns:
        if column["kind"] == "category":
            known.setdefault(column["name"], set()).add(column["value"])
    rows = torch.zeros(len(records), len(columns), dtype=torch.float64)
    for i, record in enumerate(records):
        for j, column in enumerate(columns):
            value = record.get(column["name"])
            if column["kind"] == "numeric":
                rows[i, j] = math.nan if value is None else float(value)
            elif value is not None:
                want = column["value"]
                own = value in known[column["name"]]
                rows[i, j] = float(value == want or (not own and want == OTHER_CATEGORY))
    return rows


def served_module(trainer: IncrementalTrainer) -> tuple[ServedModel, dict[str, Any]]:
    """The served model of ``trainer`` (a deep copy: training on does not change it) and its
    metadata: input columns, task, classes, target, how to read the output."""
    import copy

    model = trainer.model
    if model is None or trainer.task is None:
        raise ConfigError("the model has not learned anything yet: nothing to export")
    encoder = trainer.encoder
    scaler = encoder.scaler
    mlps = [copy.deepcopy(member) for member in trainer.members]
    for mlp in mlps:
        mlp.eval()
        for parameter in mlp.parameters():
            parameter.requires_grad_(False)
    regression = trainer.task == "regression"
    expert = None
    if trainer.expert is not None:
        tensors = trainer.expert.state_tensors()
        expert = (tensors["weight"], tensors["bias"])
    weights = trainer.mixture.weights().tolist()
    y_mean = float(trainer.y_scaler.mean[0]) if regression else 0.0
    y_std = float(trainer.y_scaler.std()[0]) if regression else 1.0
    module = ServedModel(
        mlps,
        n_columns=encoder.n_columns,
        numeric_columns=list(encoder.numeric_columns),
        mean=torch.from_numpy(scaler.mean.copy()),
        std=torch.from_numpy(scaler.std().copy()),
        clip=scaler.clip,
        model_in=model.in_features,
        regression=regression,
        expert=expert,
        weights=weights,
        y_mean=y_mean,
        y_std=y_std,
    )
    module.eval()
    metadata: dict[str, Any] = {
        "format_version": EXPORT_FORMAT_VERSION,
        "stream_trainer_version": __version__,
        "task": trainer.task,
        "target": trainer.target,
        "classes": list(trainer.classes) if not regression else None,
        "input_columns": input_columns(trainer),
        "other_category": OTHER_CATEGORY,
        "output": "values, shape (N,)"
        if regression
        else "class probabilities, shape (N, len(classes)), columns in the order of classes",
        "input": "float (N, len(input_columns)): numeric -> raw value (NaN if missing); "
        "category -> 1.0 for the record's value, else 0.0",
        "samples_seen": trainer.samples_trained,
        "step": trainer.steps,
        "expert_weights": trainer.expert_weights(),
    }
    return module, metadata


def export_torchscript(
    trainer: IncrementalTrainer, path: str | Path, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the served model as TorchScript to ``path``, its metadata (plus ``extra``) to
    ``path + ".json"`` and inside the archive (``extra_files["metadata.json"]``); return the
    metadata. Load it with ``torch.jit.load(path)``: no stream-trainer needed."""
    module, metadata = served_module(trainer)
    metadata.update(extra or {})
    n = len(metadata["input_columns"])
    example = torch.zeros(2, n, dtype=torch.float32)
    with torch.no_grad():
        scripted = torch.jit.trace(module, example, check_trace=False)
    text = json.dumps(metadata, indent=2, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path), _extra_files={"metadata.json": text})
    Path(f"{path}.json").write_text(text + "\n")
    return metadata
