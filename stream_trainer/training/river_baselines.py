"""river's learners as baselines, run through exactly the same prequential protocol.

``--model river:NAME`` swaps the MLP for one of river's learners while everything else stays: the
same record checks, the same encoded features (standardized numbers and one-hot categories, given to
river as a dict keyed by column name), the same scoring code. Only the two hooks differ: predictions
come from ``predict_proba_one``/``predict_one`` and learning is ``learn_one`` per labelled record,
in stream order. Baselines are for comparison and are not checkpointed.

Multiclass logistic regression is one-vs-rest (``river.multiclass.OneVsRestClassifier``), which for
two classes learns the same boundary as a binary ``LogisticRegression``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from stream_trainer.errors import ConfigError
from stream_trainer.records import Record
from stream_trainer.training.config import RIVER_MODELS, TrainerConfig
from stream_trainer.training.trainer import IncrementalTrainer, Served, StepReport

__all__ = ["RIVER_MODELS", "RiverLearner"]


def _classifiers(seed: int) -> dict[str, Callable[[], Any]]:
    from river import forest, linear_model, multiclass, naive_bayes, tree

    return {
        "LogisticRegression": lambda: multiclass.OneVsRestClassifier(
            linear_model.LogisticRegression()
        ),
        "ARF": lambda: forest.ARFClassifier(seed=seed),
        "HoeffdingAdaptiveTree": lambda: tree.HoeffdingAdaptiveTreeClassifier(seed=seed),
        "HoeffdingTree": lambda: tree.HoeffdingTreeClassifier(),
        "GaussianNB": lambda: naive_bayes.GaussianNB(),
    }


def _regressors(seed: int) -> dict[str, Callable[[], Any]]:
    from river import forest, linear_model, tree

    return {
        "LinearRegression": lambda: linear_model.LinearRegression(),
        "ARF": lambda: forest.ARFRegressor(seed=seed),
        "HoeffdingAdaptiveTree": lambda: tree.HoeffdingAdaptiveTreeRegressor(seed=seed),
    }


class RiverLearner(IncrementalTrainer):
    """A river learner behind the trainer's prequential protocol (see the module docstring)."""

    def __init__(self, name: str, config: TrainerConfig) -> None:
        super().__init__(config)
        if name not in RIVER_MODELS:
            raise ConfigError(f"unknown river model {name!r}; valid: {', '.join(RIVER_MODELS)}")
        self.name = name
        self.river_model: Any = None

    def warm_up(self) -> None:
        """Nothing to pay ahead: a river learner has no torch optimizer."""

    def _ensure_model(self) -> Any:
        if self.river_model is None:
            table = (
                _regressors(self.config.seed)
                if self.task == "regression"
                else _classifiers(self.config.seed)
            )
            if self.name not in table:
                kind = "regression" if self.task == "regression" else "classification"
                raise ConfigError(
                    f"river model {self.name!r} does not do {kind}; valid: {', '.join(table)}"
                )
            self.river_model = table[self.name]()
        return self.river_model

    def _rows(self, x: np.ndarray) -> list[dict[int, float]]:
        return [dict(enumerate(row.tolist())) for row in x]

    def predict_encoded(
        self, x: np.ndarray, report: StepReport, learn_rows: np.ndarray | None = None
    ) -> Served:
        if self.river_model is None:
            return Served()
        rows = self._rows(x)
        if self.task == "regression":
            report.values = np.asarray(
                [float(self.river_model.predict_one(r) or 0.0) for r in rows]
            )
            return Served()
        k = len(self.classes)
        proba = np.zeros((len(rows), k))
        for i, row in enumerate(rows):
            for cls, p in self.river_model.predict_proba_one(row).items():
                if 0 <= cls < k:
                    proba[i, cls] = p
            total = proba[i].sum()
            proba[i] = proba[i] / total if total > 0 else 1.0 / max(k, 1)
        report.proba = proba
        return Served()

    def _serve(self, records: Sequence[Record]) -> tuple[np.ndarray | None, list[int]]:
        """The read-only predictions of ``predict_many`` / ``predict_proba_many``: the records
        that pass the checks, encoded with the current statistics, through the river model."""
        ok = [i for i, r in enumerate(records) if self._check(r) is None]
        if self.river_model is None or not ok:
            return None, ok
        report = StepReport(size=len(ok))
        self.predict_encoded(self.encoder.transform([records[i].value for i in ok]), report)
        return (report.values if self.task == "regression" else report.proba), ok

    def learn_encoded(
        self, x_np: np.ndarray, y: np.ndarray, graph: list[torch.Tensor] | None = None
    ) -> float | None:
        model = self._ensure_model()
        for row, target in zip(self._rows(x_np), y.tolist(), strict=True):
            model.learn_one(row, target)
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise ConfigError("river baselines are for evaluation only and are not checkpointed")

    def state_json(self) -> dict[str, Any]:
        raise ConfigError("river baselines are for evaluation only and are not checkpointed")
