"""Training on 1 vs 2 processes (torchrun, gloo on this CPU): the Figshare fold-1 recipe, shortened.

    python benchmarks/bench_ddp.py [--epochs 4] [--processes 1 2] [--keep runs/bench-ddp]

MobileNetV2 from the shared ImageNet weights, the default recipe with ``--epochs`` epochs, trained on Figshare
folds 2-5 and tested on the patient-disjoint fold 1, once per process count, each a fresh ``brainscan train``
(under ``torchrun --nproc-per-node N`` for N > 1) run one after the other. Prints per run: minutes (wall, data
reading included: every rank reads the data), training images/s over the epochs that train the backbone (from
``history.csv``), and test accuracy; last line, one JSON object. On 2 cores the processes share the cores (each
gets one torch thread): expect no gain, and the honest figure is the point. With a GPU machine, run the same with
``--device cuda`` (see ``--extra``); none is needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figshare_fold import FIGSHARE, WEIGHTS, fold_index  # this script's folder is on sys.path when run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, index: Path, out: Path, epochs: int, extra: list[str]) -> dict[str, float]:
    args = ["-m", "brainscan", "train", "--data", str(FIGSHARE), "--index", str(index), "--model", "mobilenet_v2",
            "--weights", str(WEIGHTS), "--epochs", str(epochs), "--out", str(out), "-q", *extra]  # fmt: skip
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
        command = [*launcher, *args]
    else:
        command = [sys.executable, *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    if done.returncode != 0:
        raise SystemExit(
            f"{processes} process(es) failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    history = list(csv.DictReader((out / "history.csv").open()))
    with (out / "split.csv").open(newline="") as f:
        n_train = sum(r["split"] == "train" for r in csv.DictReader(f))
    batch = 32  # TrainConfig's default batch size: the loader drops a last partial batch
    full = [r for r in history if r["stage"].startswith("full")]
    seconds = sum(float(r["seconds"]) for r in full)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": processes,
        "minutes": round(minutes, 2),
        "train_images_per_s": round(len(full) * (n_train // batch) * batch / seconds, 1) if seconds else 0.0,
        "epoch_seconds": [float(r["seconds"]) for r in history],
        "test_accuracy": round(metrics["accuracy"], 4),
        "test_balanced_accuracy": round(metrics["balanced_accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories under this folder")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `brainscan train` options")
    args = parser.parse_args()
    if not FIGSHARE.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {FIGSHARE} and {WEIGHTS}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        index = fold_index(1, folder)
        results = []
        for n in args.processes:
            results.append(run(n, index, folder / f"p{n}", args.epochs, args.extra))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["train_images_per_s"]
    summary = {"epochs": args.epochs, "runs": results}
    summary["speedup"] = [round(r["train_images_per_s"] / base, 3) if base else None for r in results]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
