"""Training speed: a naive PyTorch loop vs brainscan's default pipeline, same model, data, epochs and seed.

    python benchmarks/bench_train.py [--train-images 1200] [--epochs 12] [--four-class]

Data: a seeded, stratified sample of Figshare folds 2–5 for training (plus 15% of it held back as brainscan's
validation split, which the naive loop simply does not use) and the patient-disjoint fold 1 as the test set.
Model: MobileNetV2 from the shared ImageNet weights, AdamW, cosine schedule; epochs default to brainscan's.

* naive: the notebook loop at 224 px — PIL decode + resize of every image every epoch, torchvision.transforms.v2
  augmentation, NCHW float32, all layers trained from the first epoch;
* brainscan: ``brainscan.train`` with its defaults (decode once into a uint8 cache, channels-last, a head-only
  epoch on cached backbone features, pretrained early blocks frozen, memory-bounded passes, progressive resizing
  128 → 160 px with the last quarter of the epochs at the served 160 px);
* brainscan-224: brainscan at the naive loop's 224 px with every layer trained (``--image-size 224 --low-res 192
  --train-early-layers``), to show what the resolution and the frozen early blocks are worth.

Each variant runs in its own process, so peak RSS is its own. ``--four-class`` adds one brainscan run on the
whole 7,023-image 4-class set (trained on ``Training/``, tested on ``Testing/``, same epochs) for its peak RSS
and its raw vs de-leaked ``Testing/`` accuracy. Last line: one JSON object with ``speedup`` (naive wall time ÷
brainscan wall time) and ``accuracy_delta`` (brainscan − naive, test accuracy), and both for brainscan at 224 px
(``speedup_224``, ``accuracy_delta_224``). Wall times: the naive loop's training and test pass; everything
``brainscan.train`` does (decoding, duplicate matching, validation, calibration, the test pass).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from brainscan import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIGSHARE = SHARED / "data" / "figshare-cheng"
FOUR_CLASS = SHARED / "data" / "brain-tumor-mri-4class"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-imagenet-int8-dequantized.pth"


def write_index(folder: Path, train_images: int, seed: int) -> Path:
    """train/val from a stratified sample of folds 2–5, test = fold 1."""
    from sklearn.model_selection import train_test_split

    with (FIGSHARE / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    pool = [r for r in rows if r["cv_fold"] != "1"]
    picked, _ = train_test_split(pool, train_size=train_images, stratify=[r["label"] for r in pool], random_state=seed)
    train, val = train_test_split(picked, test_size=0.15, stratify=[r["label"] for r in picked], random_state=seed)
    index = folder / "bench-index.csv"
    with index.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        for split, chosen in (("train", train), ("val", val), ("test", [r for r in rows if r["cv_fold"] == "1"])):
            writer.writerows({"path": r["path"], "label": r["label"], "split": split} for r in chosen)
    return index


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_naive(index: Path, epochs: int, seed: int, size: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from brainscan.models import IMAGENET_MEAN, IMAGENET_STD, create_model

    torch.manual_seed(seed)
    with index.open(newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = v2.Compose(
        [v2.Resize((size, size)), v2.RandomHorizontalFlip(), v2.RandomAffine(10, (0.05, 0.05), (0.9, 1.1)),
         v2.ColorJitter(0.2, 0.2), *norm]
    )  # fmt: skip
    eval_tf = v2.Compose([v2.Resize((size, size)), *norm])

    class Files(Dataset):
        def __init__(self, split: str, tf: v2.Compose) -> None:
            self.items = [(FIGSHARE / r["path"], classes.index(r["label"])) for r in rows if r["split"] == split]
            self.tf = tf

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            path, label = self.items[i]
            with Image.open(path) as image:
                return self.tf(image.convert("RGB")), label

    train_set = Files("train", train_tf)
    loader = DataLoader(
        train_set, batch_size=32, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    model = create_model("mobilenet_v2", len(classes), str(WEIGHTS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    start = time.time()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    train_seconds = time.time() - start
    model.eval()
    correct = []
    with torch.no_grad():
        for x, y in DataLoader(Files("test", eval_tf), batch_size=64):
            correct += (model(x).argmax(1) == y).tolist()
    wall = time.time() - start  # training and the test pass, as brainscan's wall time includes its test pass
    return {
        "train_seconds": round(wall, 1),
        "training_loop_seconds": round(train_seconds, 1),
        "images_per_second": round(epochs * len(train_set) / train_seconds, 2),
        "accuracy": round(float(np.mean(correct)), 4),
        "n_test": len(correct),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def run_brainscan(
    index: Path | None, epochs: int, seed: int, out: Path, root: Path, *, at_224: bool = False, **data: Any
) -> dict:
    from brainscan import DataConfig, ModelConfig, RunConfig, train

    size = {"image_size": 224} if at_224 else {}
    recipe = {"low_res": 192, "freeze_early": False} if at_224 else {}
    config = RunConfig(
        data=DataConfig(root=str(root), index=str(index) if index else None, **size, **data),
        out=str(out),
        model=ModelConfig(name="mobilenet_v2", weights=str(WEIGHTS)),
        train=TrainConfig(epochs=epochs, seed=seed, **recipe),
    )
    start = time.time()
    result = train(config)
    wall = time.time() - start  # decoding, training and final evaluation: everything the user waits for
    n_train = result.metrics["protocol"]["n_images"]["train"]
    figures = {
        "train_seconds": round(wall, 1),
        "images_per_second": round(epochs * n_train / wall, 2),
        "accuracy": round(result.metrics["accuracy"], 4),
        "n_test": result.metrics["protocol"]["n_evaluated"],
        "peak_rss_mb": round(peak_rss_mb()),
        **{k: round(result.metrics["calibration"][k], 4) for k in ("ece_before", "ece_after", "temperature")},
    }
    deleaked = result.metrics.get("deleaked")
    if deleaked:  # a predefined split with duplicates across it
        figures["deleaked_accuracy"] = round(deleaked["accuracy"], 4) if "accuracy" in deleaked else None
        figures["deleaked_balanced_accuracy"] = round(deleaked.get("balanced_accuracy", float("nan")), 4)
        figures["n_test_deleaked"] = deleaked["protocol"]["n_evaluated"]
    return figures


def child(args: argparse.Namespace) -> None:
    if args.variant == "naive":
        figures = run_naive(args.index, args.epochs, args.seed, args.image_size)
    elif args.variant in ("brainscan", "brainscan-224"):
        figures = run_brainscan(
            args.index, args.epochs, args.seed, args.out, FIGSHARE, at_224=args.variant == "brainscan-224"
        )
    else:
        # the set holds 4 slices filed under both meningioma and pituitary (the audit's conflicting groups)
        figures = run_brainscan(None, args.epochs, args.seed, args.out, FOUR_CLASS, drop_conflicts=True)
    print(json.dumps(figures))


def spawn(variant: str, index: Path, args: argparse.Namespace, out: Path, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--index", str(index), "--epochs", str(epochs),
           "--seed", str(args.seed), "--image-size", str(args.image_size), "--out", str(out)]  # fmt: skip
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = round(time.time() - start, 1)
    print(variant, json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224, help="the naive loop's input size")
    parser.add_argument(
        "--four-class", action="store_true", help="also train on the 7,023-image 4-class set: peak RSS, raw/de-leaked"
    )
    parser.add_argument("--variant", choices=["naive", "brainscan", "brainscan-224", "4class"], help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    if not FIGSHARE.is_dir() or not WEIGHTS.is_file():
        sys.exit(f"needs {FIGSHARE} and {WEIGHTS} (../shared beside the checkout)")
    with tempfile.TemporaryDirectory() as tmp:
        index = write_index(Path(tmp), args.train_images, args.seed)
        naive = spawn("naive", index, args, Path(tmp) / "naive", args.epochs)
        ours = spawn("brainscan", index, args, Path(tmp) / "brainscan", args.epochs)
        at_224 = spawn("brainscan-224", index, args, Path(tmp) / "brainscan-224", args.epochs)
        four = spawn("4class", index, args, Path(tmp) / "4class", args.epochs) if args.four_class else None
    figures = {
        "epochs": args.epochs,
        "train_images": args.train_images,
        "naive": naive,
        "brainscan": ours,
        "brainscan_224": at_224,
        "speedup": round(naive["train_seconds"] / ours["train_seconds"], 2),
        "accuracy_delta": round(ours["accuracy"] - naive["accuracy"], 4),
        "speedup_224": round(naive["train_seconds"] / at_224["train_seconds"], 2),
        "accuracy_delta_224": round(at_224["accuracy"] - naive["accuracy"], 4),
    }
    if four:
        figures["four_class"] = four
        figures["peak_rss_mb_4class"] = four["peak_rss_mb"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
