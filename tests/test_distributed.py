"""Data-parallel training (stream_trainer.distributed) with real gloo process groups on localhost.

* a world of one is exactly the single-process trainer;
* 2 and 3 processes: identical weights on every rank after every step, equal (to float rounding)
  to one process trained on the concatenated batches; synchronized batch statistics equal those of
  the concatenated batch; ranks without records, or without labels, still step in lock-step.

The workers exchange nothing pickled: each writes its tensors with safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from stream_trainer.distributed import (
    Collectives,
    DistributedTrainer,
    LocalCollectives,
    SynchronizedMomentReducer,
    World,
    init_process_group,
    world_from_env,
)
from stream_trainer.errors import ConfigError
from stream_trainer.norms._moments import batch_moments
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig

NORMS = ("batch", "ema_batch", "batch_renorm")


def _record(i: int, *, labelled: bool = True) -> Record:
    value: dict[str, Any] = {"x1": math.sin(i), "x2": (i % 7) / 7.0 + 3.0}
    if i >= 30:
        value["x3"] = math.cos(i) * 10  # a feature appearing mid-stream
    value["c"] = f"k{i % 3 if i < 40 else i % 5}"  # categories appearing mid-stream
    label = i % 3 if i < 50 else i % 4  # a class appearing mid-stream
    if labelled:
        value["y"] = label
    return Record(value, topic="t", partition=0, offset=i)


def _global_batches() -> list[list[Record]]:
    """Batches of varied sizes; some unlabelled records."""
    batches, i = [], 0
    for size in (6, 1, 9, 4, 12, 7, 5, 16, 3, 10, 8):
        batch = []
        for _ in range(size):
            batch.append(_record(i, labelled=(i % 11 != 5)))
            i += 1
        batches.append(batch)
    return batches


def _split(batch: list[Record], world: int, step: int) -> list[list[Record]]:
    """Contiguous slices (concatenated in rank order = ``batch``); some ranks get nothing."""
    if step == 1:  # everything on the last rank
        return [[] for _ in range(world - 1)] + [batch]
    if step == 3:  # rank 0 gets only unlabelled records (and few)
        unl = [r for r in batch if "y" not in r.value]
        rest = [r for r in batch if "y" in r.value]
        return [unl] + [rest[k :: world - 1] for k in range(world - 1)] if world > 1 else [batch]
    bounds = np.linspace(0, len(batch), world + 1).round().astype(int)
    return [batch[bounds[k] : bounds[k + 1]] for k in range(world)]


def _config(norm: str, optimizer: str = "adam", members: tuple[float, ...] = ()) -> TrainerConfig:
    return TrainerConfig(
        target="y", hidden=(8, 8), norm=norm, seed=3, lr=0.01, optimizer=optimizer,
        member_momenta=members,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _without_engine(state: dict[str, Any]) -> dict[str, Any]:
    """A trainer state without the execution setting ``engine`` (how, not what, it computes)."""
    return {**state, "config": {k: v for k, v in state["config"].items() if k != "engine"}}


def _reference(
    norm: str,
    batches: list[list[Record]],
    optimizer: str = "adam",
    members: tuple[float, ...] = (),
) -> IncrementalTrainer:
    # bit for bit: the distributed trainer runs the autograd path
    config = dataclasses.replace(_config(norm, optimizer, members), engine="torch")
    trainer = IncrementalTrainer(config)
    for batch in batches:
        trainer.step(batch)
    return trainer


def _worker(
    rank: int,
    world: int,
    port: int,
    norm: str,
    out_dir: str,
    optimizer: str = "adam",
    members: tuple[float, ...] = (),
) -> None:
    torch.set_num_threads(1)
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    comm = init_process_group(world_from_env(env), timeout_seconds=60)
    try:
        # synchronized moments of a batch = moments of the concatenated batch
        gen = torch.Generator().manual_seed(7)
        parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3 + 5 for n in (5, 0, 3)]
        x = parts[rank % 3]
        reducer = SynchronizedMomentReducer(comm)
        with reducer.synchronized(placeholder=x.shape[0] == 0):
            xs = x if x.shape[0] else torch.zeros(1, 4, dtype=torch.float64)
            m = batch_moments(xs, reducer)
        moments = {"mean": m.mean, "var": m.var, "n": m.n}

        trainer = DistributedTrainer(IncrementalTrainer(_config(norm, optimizer, members)), comm)
        tensors: dict[str, torch.Tensor] = {f"moments.{k}": v for k, v in moments.items()}
        for step, batch in enumerate(_global_batches()):
            mine = _split(batch, world, step)[rank]
            trainer.step(mine, share={"n": len(mine)})
            assert [s["n"] for s in trainer.shared] == [len(p) for p in _split(batch, world, step)]
            for name, value in trainer.trainer.state_tensors().items():
                if name != "rng.torch":
                    tensors[f"{step}.{name}"] = value
        state = trainer.trainer.state_json()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(state))
        save_file(tensors, str(Path(out_dir, f"rank{rank}.safetensors")))
    finally:
        dist.destroy_process_group()


def _run(
    world: int, norm: str, tmp_path: Path, optimizer: str = "adam", members: tuple[float, ...] = ()
) -> list[dict[str, torch.Tensor]]:
    mp.start_processes(
        _worker, args=(world, _free_port(), norm, str(tmp_path), optimizer, members),
        nprocs=world, start_method="spawn", join=True,
    )  # fmt: skip
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]


# ---------------------------------------------------------------------------------- one process


@pytest.mark.parametrize(
    ("norm", "members"),
    [
        *((n, ()) for n in (*NORMS, "layer")),
        ("ema_batch", (0.01, 0.1)),
        ("batch_renorm", (0.01, 0.1)),
    ],
)
def test_world_of_one_is_the_single_process_trainer(norm: str, members: tuple[float, ...]) -> None:
    batches = _global_batches()
    ref = _reference(norm, batches, members=members)
    dt = DistributedTrainer(IncrementalTrainer(_config(norm, members=members)), LocalCollectives())
    for batch in batches:
        dt.step(batch)
    got, want = dt.trainer.state_tensors(), ref.state_tensors()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert _without_engine(dt.trainer.state_json()) == _without_engine(ref.state_json())


def test_world_of_one_regression_with_the_linear_expert() -> None:
    """Regression through the distributed step (the gathered rows carry the experts' losses and
    the inputs the linear expert steps on): exactly the single-process trainer."""
    batches = [
        [Record({**r.value, "y": 2.5 * math.sin(j) + r.value["x2"]}) for j, r in enumerate(batch)]
        for batch in _global_batches()
    ]
    # bit for bit: the distributed trainer runs the autograd path
    config = dataclasses.replace(_config("ema_batch"), task="regression", engine="torch")
    ref = IncrementalTrainer(config)
    dt = DistributedTrainer(IncrementalTrainer(config), LocalCollectives())
    for batch in batches:
        ref.step(batch)
        dt.step(batch)
    assert dt.trainer.task == "regression" and dt.trainer.expert is not None
    got, want = dt.trainer.state_tensors(), ref.state_tensors()
    assert got.keys() == want.keys() and "expert.weight" in got
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert _without_engine(dt.trainer.state_json()) == _without_engine(ref.state_json())
    assert dt.trainer.mixture.losses.sum() > 0


def test_unsynchronizable_batch_norm_is_refused() -> None:
    config = TrainerConfig(
        target="y", norm="batch", norm_options={"batch": {"track_running_stats": False}}
    )
    with pytest.raises(ConfigError, match="track_running_stats"):
        DistributedTrainer(IncrementalTrainer(config), LocalCollectives())


def test_world_from_env() -> None:
    assert world_from_env({}) == World(0, 1, 0, "127.0.0.1", 0)
    env = {"WORLD_SIZE": "3", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    assert world_from_env(env) == World(2, 3, 2, "h", 5)
    with pytest.raises(ConfigError, match="RANK must be in"):
        world_from_env({**env, "RANK": "3"})
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        world_from_env({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "5"})
    with pytest.raises(RuntimeError, match="not initialized"):
        Collectives()


# ---------------------------------------------------------------------------------- processes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "norm", "members"),
    [
        (2, "batch", ()),
        (2, "ema_batch", ()),
        (3, "batch_renorm", ()),
        (2, "ema_batch", (0.01, 0.1)),
    ],
)
def test_replicas_stay_identical_and_equal_one_process(
    world: int, norm: str, members: tuple[float, ...], tmp_path: Path
) -> None:
    # SGD: Adam divides by sqrt(v), which turns the rounding noise of gradients that are exactly
    # zero in exact arithmetic (a Linear bias before a batch norm) into lr-sized steps.
    ranks = _run(world, norm, tmp_path, "sgd", members)
    # identical weights (and optimizer state, norm statistics) on every rank after every step
    for r in range(1, world):
        assert ranks[r].keys() == ranks[0].keys()
        for name, value in ranks[0].items():
            if not name.startswith("moments."):
                assert torch.equal(ranks[r][name], value), (r, name)
    # one process trained on the concatenated batches ends (to rounding) at the same weights
    # (concatenated in rank order, which step 3 shuffles: the linear expert steps row by row)
    batches = [
        [r for part in _split(batch, world, step) for r in part]
        for step, batch in enumerate(_global_batches())
    ]
    ref = _reference(norm, batches, "sgd", members)
    assert len(ref.members) == max(1, len(members))
    last = len(_global_batches()) - 1
    assert all(f"{last}.member{k}.model.head.weight" in ranks[0] for k in range(1, len(members)))
    for name, value in ref.state_tensors().items():
        if name != "rng.torch":
            got = ranks[0][f"{last}.{name}"]
            assert torch.allclose(got.double(), value.double(), rtol=1e-4, atol=1e-5), name
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(s == states[0] for s in states)
    want = ref.state_json()
    for key in ("classes", "samples_trained", "predicted_only", "steps", "rejected"):
        assert states[0][key] == want[key], key
    assert states[0]["encoder"]["numeric"] == want["encoder"]["numeric"]
    assert states[0]["encoder"]["categories"] == want["encoder"]["categories"]
    np.testing.assert_allclose(
        states[0]["encoder"]["scaler"]["m2"], want["encoder"]["scaler"]["m2"], rtol=1e-9
    )
    # prequential metrics over everyone's rows: those of the concatenated batches
    got_m, want_m = states[0]["metrics"]["classification"], want["metrics"]["classification"]
    assert (got_m["n"], got_m["correct"]) == (want_m["n"], want_m["correct"])
    assert math.isclose(got_m["log_loss_sum"], want_m["log_loss_sum"], rel_tol=1e-6)
    # synchronized batch statistics = statistics of the concatenated batch
    gen = torch.Generator().manual_seed(7)
    parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3 + 5 for n in (5, 0, 3)]
    whole = torch.cat([parts[r % 3] for r in range(world)])
    for r in range(world):
        torch.testing.assert_close(ranks[r]["moments.mean"], whole.mean(0))
        torch.testing.assert_close(ranks[r]["moments.var"], whole.var(0, unbiased=False))
        assert ranks[r]["moments.n"][0].item() == whole.shape[0]


def _kinds_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Step 0 brings a new field ``f``: a number on rank 0, mostly text on rank 1 (so each
    replica's own screen decides another kind). Later steps are ordinary."""
    torch.set_num_threads(1)
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    comm = init_process_group(world_from_env(env), timeout_seconds=60)
    try:
        trainer = DistributedTrainer(IncrementalTrainer(_config("ema_batch")), comm)
        if rank == 0:
            first = [Record({"x": 0.1 * i, "f": float(i), "y": i % 2}) for i in range(3)]
        else:
            first = [
                Record({"x": 0.2, "f": "text", "y": 1}),
                Record({"x": 0.3, "f": 7, "y": 0}),
                Record({"x": 0.4, "f": "more text", "y": 1}),
            ]
        report = trainer.step(first)
        reasons = [r.reason.value for r in report.rejected]
        for step in range(1, 4):
            trainer.step([Record({"x": 0.1 * (step + rank), "f": float(step), "y": step % 2})])
        out = {"reasons": reasons, "state": trainer.trainer.state_json()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_field_new_on_two_replicas_with_different_kinds_is_decided_by_the_lower_rank(
    tmp_path: Path,
) -> None:
    mp.start_processes(
        _kinds_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn",
        join=True,
    )  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # rank 1's own screen rejects its number (text is its majority), the exchange its text
    assert ranks[0]["reasons"] == [] and ranks[1]["reasons"] == ["wrong_type"] * 3
    assert ranks[0]["state"] == ranks[1]["state"]  # the replicas still agree on everything
    state = ranks[0]["state"]
    assert state["encoder"]["kinds"]["f"] == "num"
    assert state["rejected"] == {"wrong_type": 3}
    assert state["samples_trained"] == 3 + 3 * 2
