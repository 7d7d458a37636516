"""Training with torchrun: 2 gloo processes on the CPU follow one process with the same global batch, write one
run folder, resume, and end cleanly when a rank dies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ocula
from ocula.modelfile import read_model_file

import synthetic

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# The engine alone, on a model without batch norm or dropout: one process and two must take the same steps.
ENGINE_SCRIPT = """
import sys, torch
from ocula.engine import distributed
from ocula.engine.batches import ArrayBatches
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.modelfile import ModelInfo

g = torch.Generator().manual_seed(0)
x, y = torch.randn(96, 1, 4, 4, generator=g), torch.randint(3, (96,), generator=g)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
config = TrainConfig(epochs=3, batch_size=16, lr=0.05, optimizer="sgd", schedule="cosine", threads=1)
trainer = Trainer(model, config, info=ModelInfo("classify", "none", {}), progress=False,
                  loss_fn=lambda m, a, b: torch.nn.functional.cross_entropy(m(a), b),
                  train_batches=ArrayBatches(x, y, 16))
history = trainer.fit()
if distributed.is_main():
    torch.save({"weights": model.state_dict(), "losses": [h["loss"] for h in history]}, sys.argv[1])
distributed.cleanup()
"""


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    single = subprocess.run([sys.executable, script, tmp_path / "one.pt"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([*TORCHRUN, script, tmp_path / "two.pt"], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # Each rank averages its half of a batch and DDP averages the halves: the same mean, summed in another order.
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    for k, v in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], v, rtol=1e-5, atol=1e-6)


TASKS = {
    "classify": (lambda root: synthetic.class_folder(root, per_class=16),
                 ["--epochs", "2", "--batch-size", "16", "--widths", "8", "16"]),
    "segment": (synthetic.mask_folder, ["--epochs", "2", "--batch-size", "4", "--crop", "32"]),
    "detect": (lambda root: synthetic.detection_folder(root, "voc"),
               ["--epochs", "1", "--steps-per-epoch", "2", "--minutes", "0", "--batch-size", "2"]),
}


def train(data, runs, extra, launcher=TORCHRUN):
    command = [*launcher, "-m", "ocula", "train", str(data), "--runs-dir", str(runs), "--threads", "1", "--quiet",
               *extra]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.mark.parametrize("task", list(TASKS))
def test_torchrun_trains_every_task_into_one_run_folder(task, tmp_path):
    make, extra = TASKS[task]
    data = make(tmp_path / "data")
    out = train(data, tmp_path / "runs", extra)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # printed once, by rank 0
    assert [p.name for p in (tmp_path / "runs" / task).iterdir()] == ["data-" + summary["model"]]
    model = ocula.load(summary["model_file"], device="cpu")
    assert model.info.task == task and not any(k.startswith("module.") for k in model.module.state_dict())
    rows = (Path(summary["model_file"]).parent / "metrics.csv").read_text().splitlines()
    assert "images_per_second" in rows[0] and len(rows) == 1 + int(extra[1])


def test_a_ddp_run_resumes_to_the_weights_of_a_straight_run(tmp_path):
    make, extra = TASKS["classify"]
    data = make(tmp_path / "data")
    extra = [*extra, "--schedule", "constant"]  # so that 2 epochs and 1 more follow the path of 3
    assert train(data, tmp_path / "resumed", extra).returncode == 0
    resumed = train(data, tmp_path / "resumed", ["--epochs", "3", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    straight = train(data, tmp_path / "straight", ["--epochs", "3", *extra[2:]])
    assert straight.returncode == 0, straight.stderr
    _, a, _ = read_model_file(json.loads(resumed.stdout)["model_file"])
    _, b, _ = read_model_file(json.loads(straight.stdout)["model_file"])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_killed_rank_ends_the_job_instead_of_hanging(tmp_path):
    data = synthetic.class_folder(tmp_path / "data", per_class=16)
    command = [*TORCHRUN, "-m", "ocula", "train", str(data), "--runs-dir", str(tmp_path), "--threads", "1",
               "--quiet", "--epochs", "500", "--batch-size", "16", "--widths", "8", "16"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "classify" / "data-cnn"
    deadline = time.time() + 60
    while not (run_dir / "last.ocula").exists() and time.time() < deadline:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGKILL)
    try:
        job.wait(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0 and not (run_dir / "model.ocula").exists()


def test_sync_bn_on_a_cpu_is_a_clear_error(tmp_path):
    make, extra = TASKS["classify"]
    out = train(make(tmp_path / "data"), tmp_path / "runs", [*extra, "--sync-bn"])
    assert out.returncode != 0 and "sync_bn needs CUDA" in out.stderr


def test_sharded_prediction_merges_into_the_single_process_answer(tmp_path):
    make, extra = TASKS["classify"]
    data = make(tmp_path / "data")
    model = ocula.train(str(data), "cnn", runs_dir=tmp_path, progress=False, threads=1, epochs=1, widths=[8, 16])
    base = ["-m", "ocula", "predict", str(model.path), str(data / "test" / "dark"), str(data / "test" / "bright"),
            "--json", "--out", ""]
    alone = subprocess.run([sys.executable, *base], capture_output=True, text=True)
    merged = subprocess.run([*TORCHRUN, *base], capture_output=True, text=True)
    assert alone.returncode == 0 and merged.returncode == 0, merged.stderr
    assert json.loads(merged.stdout) == json.loads(alone.stdout)
    halves = [json.loads(subprocess.run([sys.executable, *base, "--shard", f"{i}/2"], capture_output=True,
                                        text=True).stdout) for i in range(2)]
    assert halves[0] + halves[1] == json.loads(alone.stdout)
