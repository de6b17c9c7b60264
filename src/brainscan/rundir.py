"""Run directories are owned: a new run never lands in a folder that holds anything else, an existing run is only
continued (``--resume``) or moved aside (``--overwrite``, never deleted), and every run records what defines it
(``run.json``: digests of its config and of its images), so a finished run is reused only for the same config
and the same data."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .about import __version__
from .config import RunConfig
from .errors import BrainscanError, display_path
from .files import write_json

log = logging.getLogger(__name__)

IDENTITY = "run.json"
# settings that change where or how fast a run goes, not what it computes
NOT_IDENTITY = {"out", "data.cache_dir", "train.device", "train.precision", "train.threads"}


def flat_config(config: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.seed": 0, ...}``: the settings that define an experiment, flattened (no output or cache paths)."""
    tree = config.to_dict() if isinstance(config, RunConfig) else config
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for field, v in items:
            name = f"{key}.{field}" if field is not None else key
            if name not in NOT_IDENTITY:
                flat[name] = v
    return flat


def config_digest(config: RunConfig | Mapping[str, Any]) -> str:
    return _digest(flat_config(config))


def data_digest(rows: Iterable[Mapping[str, str]]) -> str:
    """The images a run used: path, label, split and content hash of each (order-free)."""
    return _digest(sorted((r["path"], r["label"], r["split"], r["sha1"]) for r in rows))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def identity(config: RunConfig, rows: Iterable[Mapping[str, str]]) -> dict[str, str]:
    return {"config_sha256": config_digest(config), "data_sha256": data_digest(rows)}


def write_identity(run_dir: Path, config: RunConfig, rows: Iterable[Mapping[str, str]]) -> None:
    write_json(run_dir / IDENTITY, {**identity(config, rows), "brainscan": __version__, "written": time.ctime()})


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The run's recorded identity, or None when it has none (not a run, or one from brainscan 0.1)."""
    try:
        return json.loads((run_dir / IDENTITY).read_text())
    except (OSError, ValueError):
        return None


def config_differences(recorded: RunConfig | Mapping[str, Any], wanted: RunConfig) -> list[str]:
    """``["train.seed 0 → 5", ...]``: the settings in which ``recorded`` differs from ``wanted``."""
    old, new = flat_config(recorded), flat_config(wanted)
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's ``config.yaml`` as a dict, or None when absent or unreadable."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def check_output(
    out: Path,
    *,
    own: Callable[[str], bool] = lambda name: False,
    overwrite: bool = False,
    wanted: RunConfig | None = None,
) -> None:
    """Refuse ``out`` unless it is absent, empty, or holds only entries ``own`` accepts; with ``overwrite`` a
    folder holding anything else is accepted (:func:`claim_output` moves it aside). When ``out`` holds a run, the
    message says how its settings differ from ``wanted``."""
    if out.exists() and not out.is_dir():
        raise BrainscanError(f"{display_path(out)} is a file, not a folder: choose another --out.")
    if overwrite or not out.is_dir():
        return
    foreign = sorted(e.name for e in out.iterdir() if not own(e.name))
    if not foreign:
        return
    shown = ", ".join(display_path(n) for n in foreign[:6]) + (f" and {len(foreign) - 6} more" * (len(foreign) > 6))
    recorded = recorded_config(out) if (out / "split.csv").is_file() else None
    if recorded is None:
        raise BrainscanError(
            f"{display_path(out)} is not empty ({shown}): choose a new or empty --out, or pass --overwrite to move "
            "that folder aside (nothing is deleted)."
        )
    differences = config_differences(recorded, wanted) if wanted is not None else []
    settings = f"other settings: {'; '.join(differences[:4])}" if differences else "these settings"
    raise BrainscanError(
        f"{display_path(out)} already holds a run of {settings} ({shown}): pass --resume to continue it, "
        "--overwrite to move it aside (nothing is deleted) and start again, or choose another --out."
    )


def claim_output(out: Path, *, own: Callable[[str], bool] = lambda name: False) -> Path | None:
    """Move ``out`` aside (to ``<out>.replaced-<time>``) when it holds anything ``own`` does not accept; returns
    where it went."""
    if not out.is_dir() or all(own(e.name) for e in out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    os.rename(out, target)
    log.warning("--overwrite: moved the previous %s aside to %s (nothing deleted).", display_path(out), target)
    return target


def check_outside_data(out: Path, config: RunConfig) -> None:
    """A run written inside a data folder that is scanned for class folders would be read as data (a new class) by
    the next run (an index lists its images: nothing else in the folder is read)."""
    if config.data.root is None or config.data.index is not None or (Path(config.data.root) / "index.csv").is_file():
        return
    root, target = Path(config.data.root).resolve(), out.resolve()
    if root.is_dir() and (target == root or root in target.parents):
        raise BrainscanError(
            f"--out {display_path(out)} lies inside the data folder {display_path(root)}: the next run would read it "
            "as images. Choose an --out outside the data."
        )
