"""Every record of the hostile corpus (:mod:`tests.hostile_records`) through the Kafka decoder and
the trainer, without a broker: in the first batch of a new model and in a later batch of a
trained one. Each is rejected with its reason, predicted only, or trained, as the corpus says;
nothing raises; and the trainer's state still round-trips through a checkpoint and predicts the
same afterwards.

The same corpus runs through a real broker and Redis in
``tests/integration/test_hostile_input.py``.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from consumers.deserializer import RecordDecoder
from stream_trainer.checkpoints import Checkpoint
from stream_trainer.checkpoints.memory_store import MemoryCheckpointStore
from stream_trainer.records import Record, RejectedRecord
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from tests.hostile_records import CORPUS, TARGET, Hostile, valid_record

CONFIG = TrainerConfig(target=TARGET, task="classification", hidden=(8,), seed=0)


def _decode(raws: list[bytes]) -> tuple[list[Record], list[RejectedRecord]]:
    decoder = RecordDecoder(target=TARGET)
    records: list[Record] = []
    rejected: list[RejectedRecord] = []
    for offset, raw in enumerate(raws):
        out = decoder.decode(raw, topic="t", partition=0, offset=offset)
        (records if isinstance(out, Record) else rejected).append(out)  # type: ignore[arg-type]
    return records, rejected


def _round_trip(trainer: IncrementalTrainer) -> IncrementalTrainer:
    """Save the trainer to a checkpoint store and load it back, as the service does."""
    state = trainer.state_json()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    store = MemoryCheckpointStore()
    store.acquire_epoch("w")
    store.save(
        Checkpoint(
            tensors=trainer.state_tensors(),
            state={"trainer": state},
            offsets={"t:0": 1},
            samples=trainer.samples_trained,
            step=trainer.steps,
            epoch=store.current_epoch(),
            writer_id="w",
            config_fingerprint=CONFIG.fingerprint(),
        )
    )
    loaded = store.load_latest()
    assert loaded is not None
    return IncrementalTrainer.from_state(loaded.tensors, loaded.state["trainer"])


def _check(trainer: IncrementalTrainer, hostile: Hostile, raws: list[bytes]) -> None:
    records, decode_rejected = _decode(raws)
    before = trainer.samples_trained
    report = trainer.step(records)
    rejected = decode_rejected + report.rejected
    reasons = [r.reason.value for r in rejected]
    if hostile.outcome == "reject":
        assert reasons == [hostile.reason], [r.detail for r in rejected]
        assert report.trained == len(raws) - 1
    else:
        assert reasons == [], [r.detail for r in rejected]
        want_trained = len(raws) - (hostile.outcome == "predict")
        assert (report.trained, report.predicted_only) == (want_trained, len(raws) - want_trained)
    assert trainer.samples_trained == before + report.trained

    restored = _round_trip(trainer)
    probe, _ = _decode([valid_record(random.Random(99)) for _ in range(16)])
    np.testing.assert_allclose(
        [list(p.values()) for p in restored.predict_proba_many(probe)],  # type: ignore[union-attr]
        [list(p.values()) for p in trainer.predict_proba_many(probe)],  # type: ignore[union-attr]
        rtol=1e-6,
    )


@pytest.mark.parametrize("hostile", CORPUS, ids=[h.name for h in CORPUS])
def test_in_the_first_batch_of_a_new_model(hostile: Hostile) -> None:
    rng = random.Random(1)
    raws = [valid_record(rng), hostile.raw, valid_record(rng), valid_record(rng)]
    _check(IncrementalTrainer(CONFIG), hostile, raws)


@pytest.mark.parametrize("hostile", CORPUS, ids=[h.name for h in CORPUS])
def test_in_a_later_batch_of_a_trained_model(hostile: Hostile) -> None:
    rng = random.Random(2)
    trainer = IncrementalTrainer(CONFIG)
    for _ in range(20):
        trainer.step(_decode([valid_record(rng) for _ in range(8)])[0])
    raws = [valid_record(rng) for _ in range(5)]
    raws.insert(3, hostile.raw)
    _check(trainer, hostile, raws)


def test_the_whole_corpus_in_one_batch() -> None:
    """Rejections in one batch are independent: each record is judged on its own."""
    rng = random.Random(3)
    raws = [valid_record(rng) for _ in range(10)] + [h.raw for h in CORPUS]
    records, decode_rejected = _decode(raws)
    trainer = IncrementalTrainer(CONFIG)
    report = trainer.step(records)
    got = sorted(r.reason.value for r in decode_rejected + report.rejected)
    assert got == sorted(h.reason for h in CORPUS if h.outcome == "reject")  # type: ignore[type-var]
    assert report.predicted_only == sum(h.outcome == "predict" for h in CORPUS)
    _round_trip(trainer)
