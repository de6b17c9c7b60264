"""Inference speed: torchvision eager vs brainscan's Predictor (torch and ONNX Runtime backends) vs raw ONNX Runtime,
and folder prediction through the CLI against a plain ONNX Runtime loop over the same files.

    python benchmarks/bench_infer.py [--image-size 224] [--repeats 5] [--files 2000 | --files 0]

For MobileNetV2 and brainscan's ``cnn`` (random weights: speed does not depend on them): batch-1 latency (median)
and batch-32 throughput, all in one run on the same inputs. The Predictor timings include its uint8 → float
conversion, normalisation and softmax; the raw ORT session gets ready float input. Last line: one JSON object
with, per model, ``ort_vs_raw_b32``, ``ort_vs_eager_b32`` and ``latency_vs_raw_b1`` (brainscan ÷ reference).

Folder prediction (``--files`` real slices of the shared 4-class set, copied into a temporary folder): images/s of
``brainscan predict FOLDER --recursive --csv`` (MobileNetV2 at ``--image-size``, its ``best.onnx`` beside the
checkpoint; and without it, the in-memory graph) against a plain loop a user would write — PIL decode, grey,
resize, ONNX Runtime at batch 32, softmax, a CSV line per file — each a fresh process, start-up included, run
alternately. Goal: ``cli_vs_raw`` >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from brainscan import Predictor
from brainscan.checkpoint import save_checkpoint
from brainscan.data.transforms import Preprocess
from brainscan.export import export_model
from brainscan.models import create_model, get_spec


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_model(name: str, size: int, repeats: int, folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, 4).eval()
    preprocess = Preprocess(size, spec.mean, spec.std)
    checkpoint = folder / f"{name}.pt"
    save_checkpoint(
        {
            "arch": name,
            "class_names": ["a", "b", "c", "d"],
            "preprocess": preprocess.to_dict(),
            "model_state": model.state_dict(),
        },
        checkpoint,
    )
    onnx_path = export_model(checkpoint, fmt="onnx")
    rng = np.random.default_rng(0)
    slices = {b: rng.integers(0, 256, (b, size, size), dtype=np.uint8) for b in (1, 32)}
    eager_input = {
        b: torch.from_numpy(s).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        for b, s in slices.items()
    }
    raw_input = {b: s[:, None].astype(np.float32) for b, s in slices.items()}

    eager = create_model(name, 4).eval()  # plain torchvision usage: NCHW float32 under no_grad
    eager.load_state_dict(model.state_dict())
    via_torch = Predictor.from_checkpoint(checkpoint, backend="torch", device="cpu")
    via_ort = Predictor.from_checkpoint(checkpoint, backend="onnxruntime")
    raw = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def eager_run(b: int) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return eager(eager_input[b])

        return run

    runners = {
        "eager": eager_run,
        "predictor_torch": lambda b: lambda: via_torch.predict_proba(slices[b]),
        "predictor_ort": lambda b: lambda: via_ort.predict_proba(slices[b]),
        "raw_ort": lambda b: lambda: raw.run(None, {"slices": raw_input[b]}),
    }
    out: dict[str, float] = {}
    for key, make in runners.items():
        out[f"{key}_b1_ms"] = round(1000 * statistics.median(timed(make(1), repeats=repeats * 6)), 2)
        out[f"{key}_b32_ips"] = round(32 / statistics.median(timed(make(32), repeats=repeats)), 1)
    out["ort_vs_raw_b32"] = round(out["predictor_ort_b32_ips"] / out["raw_ort_b32_ips"], 3)
    out["ort_vs_eager_b32"] = round(out["predictor_ort_b32_ips"] / out["eager_b32_ips"], 3)
    out["latency_vs_raw_b1"] = round(out["predictor_ort_b1_ms"] / out["raw_ort_b1_ms"], 3)
    return out


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri-4class" / "Training"

RAW_LOOP = """
import csv, sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from PIL import Image
model, folder, out, size = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
with open(out, "w", newline="") as f:
    writer = csv.writer(f)
    for i in range(0, len(files), 32):
        chunk = files[i : i + 32]
        batch = np.stack([np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR)) for p in chunk])
        logits = session.run(None, {"slices": batch[:, None].astype(np.float32)})[0]
        e = np.exp(logits - logits.max(1, keepdims=True))
        for p, row in zip(chunk, e / e.sum(1, keepdims=True)):
            writer.writerow([p.relative_to(folder), int(row.argmax()), *row])
"""


def bench_folder(n_files: int, size: int, repeats: int, folder: Path) -> dict[str, float]:
    """images/s of ``brainscan predict`` on a folder of real slices vs the plain ONNX Runtime loop (fresh processes)."""
    files = sorted(SHARED.rglob("*.jpg"))
    images = folder / "slices"
    for f in files[:: max(1, len(files) // n_files)][:n_files]:  # every k-th: all four classes
        (images / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, images / f.parent.name / f.name)
    count = sum(1 for _ in images.rglob("*.jpg"))
    torch.manual_seed(0)
    spec = get_spec("mobilenet_v2")
    checkpoint = folder / "model" / "best.pt"
    checkpoint.parent.mkdir()
    payload = {"arch": "mobilenet_v2", "class_names": ["glioma", "meningioma", "notumor", "pituitary"],
               "preprocess": Preprocess(size, spec.mean, spec.std).to_dict(),
               "model_state": create_model("mobilenet_v2", 4).eval().state_dict()}  # fmt: skip
    save_checkpoint(payload, checkpoint)
    bare = folder / "bare" / "best.pt"  # no export beside it: predict builds its ONNX graph in memory
    bare.parent.mkdir()
    shutil.copy(checkpoint, bare)
    onnx_path = export_model(checkpoint, fmt="onnx")
    out = folder / "out.csv"
    brainscan = [sys.executable, "-m", "brainscan", "predict", str(images), "--recursive", "-q", "--overwrite"]
    commands = {
        "raw_loop": [sys.executable, "-c", RAW_LOOP, str(onnx_path), str(images), str(out), str(size)],
        "cli_export": [*brainscan, "-c", str(checkpoint), "--csv", str(out)],
        "cli_in_memory": [*brainscan, "-c", str(bare), "--csv", str(out)],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):  # alternating, so that a noisy moment hits every variant alike
        for name, command in commands.items():
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, float] = {"files": count}
    for name, seconds in times.items():
        result[f"{name}_ips"] = round(count / statistics.median(seconds), 1)
    result["cli_vs_raw"] = round(result["cli_export_ips"] / result["raw_loop_ips"], 3)
    result["in_memory_vs_raw"] = round(result["cli_in_memory_ips"] / result["raw_loop_ips"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=2000, help="Real slices for folder prediction (0: skip it).")
    parser.add_argument("--folder-repeats", type=int, default=2)
    args = parser.parse_args()
    results = {"image_size": args.image_size, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mobilenet_v2", "cnn"):
            results[name] = bench_model(name, args.image_size, args.repeats, Path(tmp))
            print(name, json.dumps(results[name], indent=1), flush=True)
    if args.files and SHARED.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            results["folder"] = bench_folder(args.files, args.image_size, args.folder_repeats, Path(tmp))
            print("folder", json.dumps(results["folder"], indent=1), flush=True)
    elif args.files:
        print(f"folder prediction skipped: {SHARED} is absent", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
