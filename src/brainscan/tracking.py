"""Experiment tracking, off by default and never required: a training run's settings, per-epoch history, final
metrics with their protocol, and its files, mirrored to TensorBoard or MLflow.

The run directory stays the record; a tracker holds a copy for browsing and comparing runs. Tracking is no part
of a run's identity: :class:`TrackingConfig` travels beside the :class:`~brainscan.config.RunConfig`, never inside
it, so ``config.yaml`` and ``run.json``'s config digest are the same with and without it. TensorBoard and MLflow
are imported only when asked for (``pip install 'brainscan[track]'``).

Example:
    >>> with track_training(config, TrackingConfig("mlflow")) as on_epoch_end:  # doctest: +SKIP
    ...     result = train(config, on_epoch_end=on_epoch_end)
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from .config import RunConfig
from .errors import BrainscanError, describe_error, display_path, unknown_choice

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow")
EXTRA = "pip install 'brainscan[track]'"
# the run's files copied to the tracker (MLflow artefacts; TensorBoard shows the text and the plots)
ARTEFACTS = ("metrics.json", "config.yaml", "history.csv", "run.json", "report.html", "report.json")
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "sensitivity", "specificity")
TEXT_LIMIT = 5000  # MLflow's tag values hold 8,000 characters; a longer protocol entry is in metrics.json

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is mirrored: ``kind`` (``tensorboard``, ``mlflow`` or None: off), ``uri`` (TensorBoard: a log
    folder; MLflow: a tracking URI or a folder for an SQLite store; None: inside the run directory) and
    ``experiment`` (None: named after the data folder)."""

    kind: str | None = None
    uri: str | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.uri is not None or self.experiment is not None:
                raise BrainscanError("--log-uri and --log-experiment need --log tensorboard or --log mlflow.")
            return
        kind = self.kind.strip().lower()
        if kind not in TRACKERS:
            raise unknown_choice("tracker", self.kind, TRACKERS)
        object.__setattr__(self, "kind", kind)
        if self.uri is not None and not self.uri.strip():
            raise BrainscanError("--log-uri is empty: give a folder or a tracking URI, or leave it out.")
        if self.experiment is not None and not self.experiment.strip():
            raise BrainscanError("--log-experiment is empty: give a name, or leave it out (the data folder's name).")

    @property
    def enabled(self) -> bool:
        return self.kind is not None


class RunTracker(Protocol):
    """One tracked training run: opened once the run directory exists, fed each epoch's history row, finished
    with the run's results, closed with its outcome."""

    def start(self, run_dir: Path, *, resume: bool) -> None: ...

    def log_epoch(self, row: Mapping[str, Any]) -> None: ...

    def finish(self, run_dir: Path) -> None: ...

    def close(self, status: str) -> None: ...


NO_TRACKING = TrackingConfig()  # tracking off: the default of every command


@contextmanager
def track_training(
    config: RunConfig, tracking: TrackingConfig, *, resume: bool = False
) -> Iterator[EpochCallback | None]:
    """Mirror the training run that the ``with`` body runs into ``config.out`` to ``tracking``'s tracker.

    Yields the ``on_epoch_end`` callback for :func:`~brainscan.train.train` (None when tracking is off: nothing is
    imported or written). The tracker opens at the first epoch's end, once the run directory exists (a run that
    fails before training leaves nothing in it or in the tracker); on leaving the ``with`` it logs ``metrics.json``
    and the run's files and closes as finished, or, when the body raised, as failed (killed on Ctrl-C). With
    ``resume`` the MLflow run of the same run directory is continued (TensorBoard appends to its log folder); a
    resumed run with no epoch left to train is not tracked again.

    Raises:
        BrainscanError: the tracker's package is not installed (the message names the extra), before any training;
            or the tracker failed (a store that cannot be reached or written), naming it.
    """
    if not tracking.enabled:
        yield None
        return
    experiment = tracking.experiment or default_experiment(config)
    tracker = open_tracker(tracking, experiment)
    run_dir = Path(config.out)
    started = False

    def on_epoch_end(row: dict[str, Any]) -> None:
        nonlocal started
        with _tracker_errors(tracking):
            if not started:
                started = True  # closed as failed even when opening fails half-way
                tracker.start(run_dir, resume=resume)
            tracker.log_epoch(row)

    try:
        yield on_epoch_end
    except BaseException as exc:
        if started:
            _close_after_failure(tracker, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if started:  # not on the ranks of a torchrun job other than 0: they never call on_epoch_end
        try:
            with _tracker_errors(tracking):
                tracker.finish(run_dir)
        except BaseException:
            _close_after_failure(tracker, "FAILED")
            raise
        with _tracker_errors(tracking):
            tracker.close("FINISHED")


@contextmanager
def _tracker_errors(tracking: TrackingConfig) -> Iterator[None]:
    """A tracker's own exception (a store that cannot be reached or written) as one line that names it."""
    try:
        yield
    except BrainscanError:
        raise
    except Exception as exc:
        reason = (describe_error(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BrainscanError(
            f"--log {tracking.kind}{f' --log-uri {tracking.uri}' if tracking.uri else ''}: {reason} (the run "
            "directory holds the run up to this point)"
        ) from exc


def _close_after_failure(tracker: RunTracker, status: str) -> None:
    """Mark the tracked run failed without hiding the error that failed it."""
    try:
        tracker.close(status)
    except Exception as exc:
        log.warning("Could not mark the tracked run %s: %s", status.lower(), describe_error(exc))


def open_tracker(tracking: TrackingConfig, experiment: str) -> RunTracker:
    """The tracker ``tracking`` names, its package imported (else a BrainscanError naming the extra)."""
    if tracking.kind == "tensorboard":
        return TensorBoardTracker(tracking.uri, experiment)
    if tracking.kind == "mlflow":
        return MLflowTracker(tracking.uri, experiment)
    raise unknown_choice("tracker", str(tracking.kind), TRACKERS)


def default_experiment(config: RunConfig) -> str:
    """The data folder's name (an index's folder when there is no root), e.g. ``brain-mri-yes-no``."""
    if config.data.root:
        name = Path(config.data.root).resolve().name
    else:
        name = Path(str(config.data.index)).resolve().parent.name
    return name or "brainscan"


# ------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Scalars per epoch (step = epoch), the final metrics as scalars and as the HParams dashboard's session (the
    flattened config as hyperparameters), the protocol and config as text, the plots as images.

    The log folder is ``<run dir>/tensorboard``, or ``<uri>/<experiment>/<run dir name>`` (``-2``, ``-3``, ... when
    taken by another run), so that ``tensorboard --logdir <uri>`` compares runs.
    """

    def __init__(self, uri: str | None, experiment: str) -> None:
        _require("tensorboard", "TensorBoard logging")
        self.uri, self.experiment = uri, experiment
        self.writer: Any = None
        self.step = 0

    def start(self, run_dir: Path, *, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard" if self.uri is None else Path(self.uri) / self.experiment / run_dir.name
        if self.uri is not None and not resume:
            base, n = log_dir, 1
            while log_dir.is_dir() and any(log_dir.iterdir()):
                n += 1
                log_dir = base.with_name(f"{base.name}-{n}")
        self.writer = SummaryWriter(log_dir=str(log_dir))
        log.info("Tracking to TensorBoard: %s (view it: tensorboard --logdir %s)", display_path(log_dir),
                 display_path(log_dir if self.uri is None else Path(self.uri)))  # fmt: skip

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self.step = int(row["epoch"])
        for key, value in epoch_metrics(row).items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.flush()

    def finish(self, run_dir: Path) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.step = max(self.step, _last_epoch(run_dir))
        config = _read_config(run_dir)
        metrics = _read_metrics(run_dir)
        if metrics is not None:
            final = final_metrics(metrics)
            for key, value in final.items():
                self.writer.add_scalar(key, value, self.step)
            prefix = _split_prefix(metrics)
            headline = {f"{prefix}/{k}": final[f"{prefix}/{k}"] for k in HEADLINE if f"{prefix}/{k}" in final}
            for summary in hparams({k: _hparam(v) for k, v in config.items()}, headline):
                self.writer.file_writer.add_summary(summary)
            protocol = json.dumps(metrics.get("protocol", {}), indent=2, ensure_ascii=False)
            self.writer.add_text("protocol", _code_block(protocol), self.step)
        if (run_dir / "config.yaml").is_file():
            self.writer.add_text("config", _code_block((run_dir / "config.yaml").read_text()), self.step)
        for png in sorted(run_dir.glob("*.png")):
            self.writer.add_image(f"plots/{png.stem}", _rgb(png), self.step, dataformats="HWC")

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------ MLflow


class MLflowTracker:
    """An MLflow run per training run, through an explicit ``MlflowClient`` (no global tracking URI or active
    run): the flattened config as params, the history as metrics (step = epoch), the final metrics, the protocol
    as ``protocol.*`` tags (nested entries as JSON), and the run's files as artefacts.

    The store is an SQLite database ``mlflow.db`` with an ``artifacts`` folder beside it, in ``<run dir>/mlflow`` or
    the folder ``uri``; a ``uri`` with a scheme (``sqlite:///...``, ``http://...``) is used as is. MLflow 3's file
    store (``./mlruns``) is refused by MLflow itself unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    """

    def __init__(self, uri: str | None, experiment: str) -> None:
        _require("mlflow", "MLflow logging")
        if uri is None or _local_store(uri) or uri.startswith("sqlite:"):
            _require("sqlalchemy", "MLflow's SQLite store")
            _require("alembic", "MLflow's SQLite store")
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id = ""

    def start(self, run_dir: Path, *, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        store, artifacts = mlflow_store(self.uri, run_dir)
        self.client = MlflowClient(tracking_uri=store)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            self.experiment, artifact_location=artifacts
        )  # fmt: skip
        key = run_key(run_dir)
        runs = []
        if resume:
            runs = self.client.search_runs(
                [experiment_id], f"tags.`brainscan.run_key` = '{key}'", order_by=["attributes.start_time DESC"],
                max_results=1,
            )  # fmt: skip
        identity = _read_json(run_dir / "run.json") or {}
        if runs:
            run = runs[0]
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            tags = {"brainscan.run_key": key, "brainscan.run_dir": str(run_dir.resolve())}
            tags |= {f"brainscan.{k}": str(v) for k, v in identity.items() if k in ("config_sha256", "data_sha256")}
            tags["brainscan.version"] = str(identity.get("brainscan", ""))
            run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        # params are write-once: on resume a setting that changed (only the epoch budget can) becomes a tag
        logged, config = run.data.params, {_key(k): _text(v) for k, v in _read_config(run_dir).items()}
        self._log_batch(
            params={k: v for k, v in config.items() if k not in logged},
            tags={f"brainscan.resumed.{k}": v for k, v in config.items() if logged.get(k, v) != v},
        )
        log.info("Tracking to MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, store)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self._log_batch(metrics=epoch_metrics(row), step=int(row["epoch"]))

    def finish(self, run_dir: Path) -> None:
        metrics = _read_metrics(run_dir)
        if metrics is not None:
            final = final_metrics(metrics)
            protocol = {f"protocol.{k}": _text(v) for k, v in metrics.get("protocol", {}).items()}
            self._log_batch(metrics=final, step=_last_epoch(run_dir), tags=protocol)
        for path in [run_dir / name for name in ARTEFACTS] + sorted(run_dir.glob("*.png")):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def _log_batch(
        self, *, metrics: Mapping[str, float] | None = None, step: int = 0, params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        from mlflow.entities import Metric, Param, RunTag

        stamp = int(time.time() * 1000)
        entities: list[Any] = [Metric(_key(k), float(v), stamp, step) for k, v in (metrics or {}).items()]
        entities += [Param(_key(k), v) for k, v in (params or {}).items()]
        entities += [RunTag(_key(k), v) for k, v in (tags or {}).items()]
        for i in range(0, len(entities), 100):  # MLflow's batch limit for params and tags
            chunk = entities[i : i + 100]
            self.client.log_batch(
                self.run_id,
                metrics=[e for e in chunk if isinstance(e, Metric)],
                params=[e for e in chunk if isinstance(e, Param)],
                tags=[e for e in chunk if isinstance(e, RunTag)],
            )


def mlflow_store(uri: str | None, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artefact location for a new experiment): an SQLite store in a folder (``run_dir/mlflow`` by
    default), or ``uri`` as is when it has a scheme (the server or the database's folder keeps the artefacts)."""
    if uri is not None and not _local_store(uri):
        if uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
            folder.mkdir(parents=True, exist_ok=True)  # SQLite creates the database, not its folder
            return uri, str(folder / "artifacts")
        return uri, None
    folder = (run_dir / "mlflow" if uri is None else Path(uri)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")


def _local_store(uri: str) -> bool:
    """A folder rather than a tracking URI (``http://...``, ``sqlite:///...``, ``databricks``)."""
    return "://" not in uri and not uri.startswith("databricks")


def run_key(run_dir: Path) -> str:
    """A short tag that finds a run directory's tracked run again (on ``--resume``), free of quoting trouble."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- what is logged


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row's numbers (``train_loss``, ``val_accuracy``, ``lr``, ``seconds``...), without the epoch."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and _is_number(v)}


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics.json``'s numbers outside the protocol, as ``test/accuracy``, ``test/per_class/yes/recall``...
    (``val/...`` for a final model, which has no test split)."""
    prefix = _split_prefix(metrics)
    numbers = _flatten({k: v for k, v in metrics.items() if k != "protocol"}, prefix)
    return {k: float(v) for k, v in numbers.items() if _is_number(v)}


def _split_prefix(metrics: Mapping[str, Any]) -> str:
    split = str(metrics.get("protocol", {}).get("split", "test"))
    return "test" if split == "test" else "val"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat |= _flatten(v, f"{prefix}/{k}" if prefix else str(k))
        return flat
    return {prefix: value}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _key(name: str) -> str:
    """A name MLflow accepts (a class folder may be called anything): other characters become ``_``."""
    return re.sub(r"[^/\w.\- :]", "_", name)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def _hparam(value: Any) -> Any:
    return value if isinstance(value, str | bool) or _is_number(value) else _text(value)


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: shown as is


def _rgb(png: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's own ``config.yaml`` (resolved, as trained), flattened: ``{"train.seed": 0, "out": ...}``."""
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {k.replace("/", "."): v for k, v in _flatten(tree, "").items()} if isinstance(tree, dict) else {}


def _read_metrics(run_dir: Path) -> dict[str, Any] | None:
    return _read_json(run_dir / "metrics.json")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _last_epoch(run_dir: Path) -> int:
    try:
        with (run_dir / "history.csv").open(newline="") as f:
            return max((int(row["epoch"]) for row in csv.DictReader(f)), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def _require(module: str, what: str) -> None:
    """Import ``module`` or say which extra installs it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise BrainscanError(f"{what} needs the {module} package: {EXTRA}.") from None
