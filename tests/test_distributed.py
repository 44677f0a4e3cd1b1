"""Distributed training (torchrun, DistributedDataParallel) on 2 gloo processes on the CPU: the
same updates as one process with the same global batch, rank 0 alone writing, stops agreed by all
ranks, a 2-rank run resumed on 1 rank, and validation shared between ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from zforcing_cli.checkpoint import newest_checkpoint
from zforcing_cli.data import open_dataset
from zforcing_cli.distributed import joined
from zforcing_cli.evaluate import evaluate_split
from zforcing_cli.model import ZForcing
from zforcing_cli.train import StopRequest, TrainingStopped, train

from conftest import plain, prepared_mnist, tiny_run_config

CPU = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_config(dataset, **overrides):
    """14 train images in batches of 13: a second, last batch of one image, which leaves one of
    two ranks without a row. No β: the backward head goes unused, as DDP must allow."""
    return tiny_run_config(dataset, batch_size=13, epochs=1, lr=3e-3, bwd_weight=0.0, kl_anneal=True,
                           checkpoint_every=1, keep_checkpoints=5, **overrides)


def rank_main(rank: int, port: int, data: str, root: str) -> None:
    """One of the two ranks (torch.multiprocessing.spawn's function): a whole 2-update run, then a
    run that rank 1 alone is asked to stop."""
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dataset = open_dataset(data)
    with joined("cpu") as group:
        train(Path(root) / "two-ranks", run_config(dataset), dataset, CPU, group=group)
        stop = StopRequest()
        if rank == 1:
            stop.set("SIGTERM")
        try:
            train(Path(root) / "stopped", run_config(dataset), dataset, CPU, stop=stop, group=group)
        except TrainingStopped as stopped:
            (Path(root) / f"stopped-{rank}.json").write_text(json.dumps([stopped.reason, stopped.step, str(stopped.checkpoint)]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepared_mnist(tmp_path_factory.mktemp("distributed_data"), {"train": 14, "valid": 4, "test": 4}, seed=5)


@pytest.fixture(scope="module")
def ranks_root(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(rank_main, args=(free_port(), dataset.location, str(root)), nprocs=2, join=True)
    return root


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    train(run_dir, run_config(dataset), dataset, CPU)
    return run_dir


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    weights_a, weights_b = weights(a), weights(b)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6, msg=name)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_take_the_updates_of_one_process(ranks_root, one_process):
    run_dir = ranks_root / "two-ranks"
    for name in ("step-00000001", "step-00000002", "best-00000002"):
        assert_same_weights(run_dir / "checkpoints" / name, one_process / "checkpoints" / name)
    # The weights moved (the comparison is not between two untrained models), but for the unused
    # backward head's, as in one process.
    torch.manual_seed(0)
    initial = ZForcing(run_config(open_dataset(json.loads((run_dir / "config.json").read_text())["data"]["location"])).model)

    def unmoved(run: Path) -> set[str]:
        return {n for n, w in weights(run / "checkpoints" / "step-00000002").items() if torch.equal(initial.state_dict()[n], w)}

    assert unmoved(run_dir) == unmoved(one_process) and 0 < len(unmoved(run_dir)) < len(initial.state_dict()) / 4
    # The unused backward head has no Adam state, as in one process.
    assert load_file(run_dir / "checkpoints/step-00000002/optimizer.safetensors").keys() == \
        load_file(one_process / "checkpoints/step-00000002/optimizer.safetensors").keys()
    ours, theirs = records(run_dir), records(one_process)  # written once, by rank 0
    assert [(r["type"], r["step"]) for r in ours] == [(r["type"], r["step"]) for r in theirs] == [("train", 1), ("train", 2), ("valid", 2)]
    for a, b in zip(ours, theirs):
        for name in ("loss", "kl", "elbo", "nll_bound"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-5), name
    state = json.loads((run_dir / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["skipped_steps"]) == (2, 1, 0)


def test_a_stop_on_one_rank_stops_both_after_the_same_update(ranks_root):
    outcomes = [json.loads((ranks_root / f"stopped-{rank}.json").read_text()) for rank in (0, 1)]
    checkpoint = str(ranks_root / "stopped" / "checkpoints" / "step-00000001")
    assert outcomes == [["SIGTERM", 1, checkpoint]] * 2
    assert newest_checkpoint(ranks_root / "stopped", "step").name == "step-00000001"


def test_a_two_rank_run_resumes_on_one_process(ranks_root, one_process, dataset, tmp_path):
    run_dir = tmp_path / "stopped"
    shutil.copytree(ranks_root / "stopped", run_dir)
    result = train(run_dir, run_config(dataset), dataset, CPU, resume=True)
    assert result.state.step == 2
    assert_same_weights(run_dir / "checkpoints" / "step-00000002", one_process / "checkpoints" / "step-00000002")
    assert [(r["type"], r["step"]) for r in records(run_dir)] == [("train", 1), ("train", 2), ("valid", 2)]


class Share:
    """A rank's view of the ranks for evaluate_split, without processes: its rows, and sums
    left as they are (the test adds the ranks' results itself)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def rows(self, count: int) -> slice:
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def all_reduce(self, tensor):
        return tensor


@pytest.mark.parametrize("iwae_samples", [0, 2])
def test_shared_validation_adds_up_to_one_process_s(tiny_dataset, tiny_model_config, iwae_samples):
    """Passes of 3 sequences over 8 (3, 3, 2) split among 3 ranks: one rank has no sequence in
    the last pass and must still draw its noise."""
    torch.manual_seed(0)
    model = ZForcing(tiny_model_config)
    split = tiny_dataset.split("valid")
    whole = evaluate_split(model, split, batch_size=3 * max(iwae_samples, 1), seed=4, iwae_samples=iwae_samples)
    shares = [evaluate_split(model, split, batch_size=3 * max(iwae_samples, 1), seed=4, iwae_samples=iwae_samples,
                             group=Share(rank, 3)) for rank in range(3)]
    assert sum(share.elbo for share in shares) == pytest.approx(whole.elbo, rel=1e-6)
    assert sum(share.kl for share in shares) == pytest.approx(whole.kl, rel=1e-6)
    if iwae_samples:
        assert sum(share.iwae for share in shares) == pytest.approx(whole.iwae, rel=1e-6)
    assert sum(share.steps for share in shares) == whole.steps == 8 * 784


@pytest.mark.parametrize("processes", [2, 1])
def test_torchrun_trains_with_rank_0_alone_writing_and_reporting(tiny_data, tmp_path, processes):
    """The command as users type it: `torchrun --nproc-per-node 2 -m zforcing_cli train ...`. One
    process is a group of one (the check of NCCL on a machine with one GPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", str(free_port()),
               "-m", "zforcing_cli", "train", "--data", str(tiny_data), "--out", "run", "--device", "cpu", "--threads", "1",
               "--max-steps", "2", "--batch-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZFORCING_ACTIVE_DIR": str(tmp_path / "active")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    stderr = plain(done.stderr)
    assert done.returncode == 0, stderr
    where = "on 1 process (gloo, cpu)" if processes == 1 else "on 2 processes (gloo, cpu)"
    assert stderr.count("training on mnist") == 1 and where in stderr
    assert plain(done.stdout).count("Best validation bound") == 1
    assert [(r["type"], r["step"]) for r in records(tmp_path / "run")] == [("train", 2), ("valid", 2)]  # once: by rank 0
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best-00000002", "step-00000002"]
    assert os.readlink(tmp_path / "runs" / "latest") == str((tmp_path / "run").absolute())


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint(tiny_data, tmp_path):
    """torchrun passes the signal on to both ranks; they stop after the same update, rank 0 writes
    the checkpoint and says how to continue."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "zforcing_cli", "train", "--data", str(tiny_data), "--out", "run", "--device", "cpu", "--threads", "1",
               "--max-steps", "500", "--batch-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZFORCING_ACTIVE_DIR": str(tmp_path / "active")}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:
        training = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True)
        try:
            deadline = time.monotonic() + 60
            while "parameters;" not in log.read_text() and time.monotonic() < deadline and training.poll() is None:
                time.sleep(0.2)
            training.send_signal(signal.SIGTERM)
            training.wait(timeout=60)
        finally:
            if training.poll() is None:
                training.kill()
                training.wait()
    stderr = plain(log.read_text())
    stops = re.findall(r"Stopped by SIGTERM at step (\d+); the training checkpoint (\S+) holds it\.", stderr)
    assert len(stops) == 1, stderr
    step, checkpoint = int(stops[0][0]), Path(stops[0][1])
    assert (tmp_path / checkpoint).name == f"step-{step:08d}" and (tmp_path / checkpoint / "optimizer.safetensors").is_file()
    assert json.loads((tmp_path / checkpoint / "trainer_state.json").read_text())["step"] == step < 500
    assert "To continue: torchrun --nproc-per-node 2 -m zforcing_cli train --resume --out run" in stderr
