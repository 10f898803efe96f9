"""The ``threads`` setting: torch's pool and the BLAS/OpenMP pools numpy loads, pinned together."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from stream_trainer.cli import build_parser
from stream_trainer.commands.run import service_config
from stream_trainer.errors import ConfigError
from stream_trainer.service.config import ServiceConfig, load_service_config
from stream_trainer.threads import THREAD_ENV, pin_threads

pytestmark = pytest.mark.usefixtures("restore_thread_pools")


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_one_thread_for_torch_and_numpys_blas():
    assert np.__name__  # numpy, hence its BLAS, is loaded
    threadpool_limits(limits=2)  # as a machine with two cores starts, whatever this one has
    torch.set_num_threads(2)
    assert _blas_threads() and set(_blas_threads()) == {2}

    pin_threads(1)

    assert set(_blas_threads()) == {1}
    assert {pool["num_threads"] for pool in threadpool_info()} == {1}  # OpenMP too
    assert torch.get_num_threads() == 1
    assert {os.environ[name] for name in THREAD_ENV} == {"1"}  # pools loaded later, children


def test_a_larger_count_reaches_every_pool():
    pin_threads(2)
    assert set(_blas_threads()) == {2}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_count_is_refused_before_anything_changes(bad):
    torch.set_num_threads(1)
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        pin_threads(bad)
    assert torch.get_num_threads() == 1


def test_threads_is_one_setting_of_run_file_environment_and_flag(tmp_path):
    assert ServiceConfig().threads == 1
    path = tmp_path / "service.toml"
    path.write_text("threads = 3\n")
    assert load_service_config(config_file=path, environ={}).threads == 3
    assert load_service_config(environ={"STREAM_TRAINER_THREADS": "2"}).threads == 2
    args = build_parser().parse_args(["run", "--threads", "4"])
    assert service_config(args, {"STREAM_TRAINER_THREADS": "2"}).threads == 4
    with pytest.raises(ConfigError, match="threads must be >= 1, got 0"):
        ServiceConfig(threads=0)


def test_evaluate_takes_the_flag():
    args = build_parser().parse_args(["evaluate", "--source", "x.csv", "--threads", "3"])
    assert args.threads == 3
    assert build_parser().parse_args(["evaluate", "--source", "x.csv"]).threads == 1
