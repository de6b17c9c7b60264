"""Load test of ``brainscan serve``: many concurrent clients from a second process on loopback.

    python benchmarks/bench_serve.py [--clients 200] [--requests 2000] [--max-seconds 120] [--bad-share 0.05]

Starts ``brainscan serve`` (a MobileNetV2 at 224 px with random weights, exported to ONNX: speed does not depend on
the weights) as its own process, warms it up with one request per client (RSS is reported at start and after
it), then from this process sends ``--requests`` uploads of real slices of the shared
4-class set through ``--clients`` concurrent connections, twice: all good uploads, then with ``--bad-share`` of
them bad (a text file named .png, a truncated PNG, an upload over the size limit). Each phase stops by itself
after its requests or ``--max-seconds``. Prints per phase: throughput, p50/p95/p99 latency, errors (any
unexpected status or a failed connection), and the server's RSS before and after. Goals: 0 errors; every bad
upload refused with its code (415, 422, 413) and every good one answered 200; RSS growth within 10%. Last line:
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx
import torch
from PIL import Image

from brainscan.checkpoint import save_checkpoint
from brainscan.data.transforms import Preprocess
from brainscan.export import export_model
from brainscan.models import create_model, get_spec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri-4class" / "Testing"
MAX_UPLOAD_MB = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def model(folder: Path, size: int) -> Path:
    torch.manual_seed(0)
    spec = get_spec("mobilenet_v2")
    checkpoint = folder / "best.pt"
    payload = {"arch": "mobilenet_v2", "class_names": ["glioma", "meningioma", "notumor", "pituitary"],
               "preprocess": Preprocess(size, spec.mean, spec.std).to_dict(),
               "model_state": create_model("mobilenet_v2", 4).eval().state_dict()}  # fmt: skip
    save_checkpoint(payload, checkpoint)
    return export_model(checkpoint, fmt="onnx")


def uploads(n_good: int) -> tuple[list[tuple[str, bytes]], dict[str, tuple[str, bytes, int]]]:
    """Real slices (name, bytes), and the bad kinds: name → (file name, bytes, expected status)."""
    files = sorted(SHARED.rglob("*.jpg"))
    good = [(f.name, f.read_bytes()) for f in files[:: max(1, len(files) // n_good)][:n_good]]
    buffer = BytesIO()
    Image.open(files[0]).save(buffer, format="PNG")  # a real slice as PNG, cut in half below
    bad = {
        "text": ("notes.png", b"this is a text file, not a scan\n" * 20, 415),
        "truncated": ("cut.png", buffer.getvalue()[: len(buffer.getvalue()) // 2], 422),
        "too_large": ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * int(MAX_UPLOAD_MB * 1024 * 1024 + 1024), 413),
    }
    return good, bad


def make_plan(
    n: int, good: list[tuple[str, bytes]], bad: dict[str, tuple[str, bytes, int]], bad_share: float
) -> list[tuple[str, str, bytes, int]]:
    """``n`` uploads (kind, name, bytes, expected status), ``bad_share`` of them bad, in a seeded order."""
    rng = random.Random(0)
    plan = []
    for _ in range(n):
        if rng.random() < bad_share:
            kind = rng.choice(sorted(bad))
            plan.append((kind, *bad[kind]))
        else:
            plan.append(("good", *rng.choice(good), 200))
    return plan


async def phase(url: str, plan: list[tuple[str, str, bytes, int]], clients: int, max_seconds: float) -> dict:
    """Send ``plan`` (kind, name, bytes, expected status) through ``clients`` concurrent workers."""
    latencies: list[float] = []
    outcomes: dict[str, dict[str, int]] = {}
    errors: list[str] = []
    queue = iter(plan)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        for kind, name, data, expected in queue:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/predict", files={"file": (name, data, "image/png")})
                status = response.status_code
                ok = status == expected and (status != 200 or "label" in response.json())
            except (httpx.HTTPError, ValueError) as exc:
                status, ok = 0, False
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            if kind == "good":
                latencies.append(time.perf_counter() - start)
            counts = outcomes.setdefault(kind, {})
            counts[str(status)] = counts.get(str(status), 0) + 1
            if not ok and status:
                errors.append(f"{kind}: HTTP {status}, expected {expected}")

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    seconds = time.perf_counter() - start
    done = sum(sum(c.values()) for c in outcomes.values())
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": done,
        "seconds": round(seconds, 1),
        "throughput_rps": round(done / seconds, 1),
        "p50_ms": round(1000 * q[49], 1),
        "p95_ms": round(1000 * q[94], 1),
        "p99_ms": round(1000 * q[98], 1),
        "errors": len(errors),
        "first_errors": errors[:5],
        "statuses": outcomes,
        "stopped_by_time": done < len(plan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--bad-share", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} is absent: the load test uploads real slices of the shared 4-class set.")
    good, bad = uploads(100)
    clean = make_plan(args.requests, good, bad, 0.0)
    mixed = make_plan(args.requests, good, bad, args.bad_share)
    results: dict = {"clients": args.clients, "requests": args.requests, "bad_share": args.bad_share}
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "brainscan", "serve", "--checkpoint", str(model(folder, args.image_size)),
               "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB), "-q"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))  # noqa: SIM115
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            if server.poll() is not None:
                raise SystemExit(f"server exited: {(folder / 'server.log').read_text()[-2000:]}")
        else:
            raise SystemExit("server did not answer /v1/health within 60 s")
        results["rss_at_start_mb"] = round(rss_mb(server.pid), 1)
        asyncio.run(phase(url, clean[: args.clients], args.clients, args.max_seconds))  # warm-up, not reported
        results["rss_after_warm_up_mb"] = round(rss_mb(server.pid), 1)
        for name, plan in (("clean", clean), ("with_bad_uploads", mixed)):
            before = rss_mb(server.pid)
            figures = asyncio.run(phase(url, plan, args.clients, args.max_seconds))
            after = rss_mb(server.pid)
            figures |= {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                        "rss_growth": round(after / before - 1, 3)}  # fmt: skip
            results[name] = figures
            print(name, json.dumps(figures, indent=1), flush=True)
        results["server_alive"] = server.poll() is None and httpx.get(f"{url}/v1/health").status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
