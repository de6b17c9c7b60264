"""Inference speed: torchvision eager vs brainscan's Predictor (torch and ONNX Runtime backends) vs raw ONNX Runtime.

    python benchmarks/bench_infer.py [--image-size 224] [--repeats 5]

For MobileNetV2 and brainscan's ``cnn`` (random weights: speed does not depend on them): batch-1 latency (median)
and batch-32 throughput, all in one run on the same inputs. The Predictor timings include its uint8 → float
conversion, normalisation and softmax; the raw ORT session gets ready float input. Last line: one JSON object
with, per model, ``ort_vs_raw_b32``, ``ort_vs_eager_b32`` and ``latency_vs_raw_b1`` (brainscan ÷ reference).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"image_size": args.image_size, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mobilenet_v2", "cnn"):
            results[name] = bench_model(name, args.image_size, args.repeats, Path(tmp))
            print(name, json.dumps(results[name], indent=1), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
