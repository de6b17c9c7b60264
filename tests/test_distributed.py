"""Training on several processes under torchrun: the ranks share out one process's batches, train one model, and
only rank 0 writes; a rank that dies ends the job with an error, not a hang. The real thing: two gloo processes
on loopback, launched by torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler

from brainscan import train
from brainscan.distributed import RankBatches, Ranks, from_environment
from brainscan.errors import BrainscanError

from .conftest import synthetic_slice
from .test_train import tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TINY = ["--model", "cnn", "--image-size", "32", "--batch-size", "16", "--lr", "0.002", "--no-augment", "-q"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes that overlap (noisy synthetic slices), so that the runs' figures are not all 1.0."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ddp") / "data"
    rng = np.random.default_rng(0)
    for label in ("no", "yes"):
        (root / label).mkdir(parents=True)
        for i in range(48):
            noisy = synthetic_slice(label, rng).astype(np.float32) + rng.normal(0, 60, (48, 48))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:03d}.png")
    return root


def brainscan_train(data: Path, out: Path, *extra: str, processes: int = 1, epochs: int = 4) -> subprocess.Popen:
    args = ["-m", "brainscan", "train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *TINY, *extra]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        command = [*TORCHRUN, "--nproc-per-node", str(processes), *rendezvous, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


# --------------------------------------------------------------------------------------------------- units


def test_the_ranks_together_see_exactly_one_process_s_batches_in_its_order() -> None:
    def order() -> RandomSampler:
        return RandomSampler(range(50), generator=torch.Generator().manual_seed(3))

    for drop_last in (True, False):
        single = list(RankBatches(order(), 16, drop_last, Ranks()))
        shares = [list(RankBatches(order(), 16, drop_last, Ranks(rank, 2))) for rank in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == len(single) == (3 if drop_last else 4)
        for batch, mine, yours in zip(single, *shares, strict=True):
            assert sorted(mine + yours) == sorted(batch) and not set(mine) & set(yours)
            assert abs(len(mine) - len(yours)) <= 1


def test_a_batch_smaller_than_the_world_is_refused() -> None:
    with pytest.raises(BrainscanError, match="smaller than the 4 processes"):
        RankBatches(RandomSampler(range(10)), 2, True, Ranks(0, 4))


def test_the_ranks_come_from_torchrun_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() == Ranks() and from_environment().is_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Ranks(1, 2, 1, 1) and not from_environment().is_main
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(BrainscanError, match="not integers"):
        from_environment()


# ------------------------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_two_gloo_processes_train_the_model_one_process_would(data: Path, tmp_path: Path) -> None:
    """Same global batch (16: 8 a rank), same seeded order and initialisation. The figures differ only through
    what each rank computes on its half: BatchNorm's batch statistics and the class weighting of the loss. Stated
    tolerance: test accuracy within 0.15 (2 of 15 test images), validation loss within 0.1 at every epoch."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = brainscan_train(data, one)
    finished(single)
    output = finished(brainscan_train(data, two, processes=2))
    assert output.count("Run directory:") == 1  # rank 0 alone reports
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no stray files
    assert not list(two.glob("*.tmp*")) and not list(tmp_path.glob("two.*"))
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.15
    history = [list(csv.DictReader((run / "history.csv").open())) for run in (one, two)]
    assert [r["epoch"] for r in history[1]] == ["1", "2", "3", "4"]  # one row an epoch: one writer
    for x, y in zip(*history, strict=True):
        assert abs(float(x["val_loss"]) - float(y["val_loss"])) <= 0.1
        assert x["lr"] == y["lr"]  # as many optimizer steps: the ranks shared each global batch


@pytest.mark.slow
def test_resume_works_under_torchrun(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    finished(brainscan_train(data, out, processes=2, epochs=2))
    finished(brainscan_train(data, out, "--resume", processes=2, epochs=3))
    assert [r["epoch"] for r in csv.DictReader((out / "history.csv").open())] == ["1", "2", "3"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_an_error_naming_it(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = brainscan_train(data, out, processes=2, epochs=400)
    deadline = time.monotonic() + 120
    while not (out / "history.csv").is_file():  # training has started on both ranks
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before training"
        time.sleep(0.2)
    os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
    start = time.monotonic()
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0 and time.monotonic() - start < 120
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output


def _rank_pid(launcher: int, rank: int) -> int:
    """The process torchrun started for ``rank`` (its environment says RANK)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (child / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child.name)
    raise AssertionError(f"no process of rank {rank} under {launcher}")


# ------------------------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_trains_on_a_cpu_too(data: Path, tmp_path: Path) -> None:
    config = tiny_config(data, tmp_path / "bf16", epochs=2)
    result = train(replace(config, train=replace(config.train, precision="bf16")))
    assert len(result.history) == 2 and all(np.isfinite(r["train_loss"]) for r in result.history)


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(data: Path, tmp_path: Path) -> None:
    config = tiny_config(data, tmp_path / "fp16", epochs=1)
    with pytest.raises(BrainscanError, match="fp16 needs a CUDA device"):
        train(replace(config, train=replace(config.train, precision="fp16", device="cpu")))
    assert not (tmp_path / "fp16").exists()


def test_cross_validation_refuses_torchrun_before_any_work(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from brainscan.cv import cross_validate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BrainscanError, match="does not run under torchrun"):
        cross_validate(tiny_config(data, tmp_path / "cv"), folds=2)
    assert not (tmp_path / "cv").exists()
