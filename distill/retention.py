"""Disk retention for model versions: what ``understudy models prune``, and the clean-up
after each retrain (``scheduler.keep_versions``), delete and what they keep.

Every retrain writes a version directory: a MiniLM-L6 classifier is about 90 MB, a drafter's
LoRA adapter a few MB plus about 270 MB once blue/green serving has merged it. Nightly
retrains for a few months would fill a disk. Per kind, pruning keeps

* the active version (the daemon serves it);
* the last retired one (what ``understudy models promote`` rolls back to);
* the ``keep`` newest others (candidates, rejected and older retired versions);

and deletes the files of the rest: the version directory and, for a classifier, the copies
of its training and validation data under ``runs/<id>/`` (the log and run.json stay). The
``model_versions`` row stays, with its metrics, and gets ``pruned_at``. Directories under
``models/`` that no row names (a training that failed or was killed) go too, unless a
training is running. Nothing outside ``<state_dir>/models`` and ``<state_dir>/runs`` is
deleted, whatever path a row holds.

>>> plan = plan_prune(db, state_dir, keep=5)    # doctest: +SKIP
>>> freed = apply_prune(db, plan)               # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog
from sqlalchemy import select, update

from distill import registry
from storage.models import ModelVersion, TrainingRun

log = structlog.get_logger(__name__)

PREFIXES = tuple(f"{p}-" for p in registry.PREFIX.values())
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# A "running" training row older than this is a crashed process, not a live training.
RUNNING_FOR_AT_MOST = timedelta(hours=24)


@dataclass(frozen=True)
class PruneItem:
    version: str            # the directory's name for an orphan
    kind: str
    status: str             # the row's status, or "orphan" (no row)
    paths: tuple[str, ...]  # what is deleted
    bytes: int


@dataclass(frozen=True)
class PrunePlan:
    delete: tuple[PruneItem, ...] = ()
    kept: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.delete)


def size_of(path: Path) -> int:
    """Bytes under ``path`` (0 when it does not exist); symlinks are not followed."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    if not p.is_dir():
        return 0
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() or f.is_symlink())


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _training_running(db) -> bool:
    since = datetime.now(timezone.utc) - RUNNING_FOR_AT_MOST
    with db.session() as s:
        starts = s.scalars(select(TrainingRun.started_at)
                           .where(TrainingRun.status == "running")).all()
    return any(_aware(t) >= since for t in starts)


def plan_prune(db, state_dir: Path, keep: int) -> PrunePlan:
    """What :func:`apply_prune` would delete, keeping ``keep`` non-active versions per kind
    (besides the active one and the last retired one). Deletes nothing."""
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    models, runs = registry.models_dir(state_dir), Path(state_dir) / "runs"
    versions = registry.list_versions(db)          # newest first
    delete, kept, notes = [], [], []
    for kind in sorted({v.kind for v in versions}):
        mine = [v for v in versions if v.kind == kind and v.pruned_at is None]
        retired = [v for v in mine if v.status == "retired"]
        last_retired = max(retired, key=lambda v: (_aware(v.promoted_at) or EPOCH,
                                                   _aware(v.created_at) or EPOCH),
                           default=None)
        others = 0
        for v in mine:
            if v.status == "active" or v is last_retired:
                kept.append(v.version)
                continue
            if others < keep:
                others += 1
                kept.append(v.version)
                continue
            path = Path(v.path)
            if not _inside(path, models):
                notes.append(f"{v.version}: {path} is outside {models}; not deleted")
                continue
            paths = [path]
            if v.training_run_id is not None:
                paths += [runs / str(v.training_run_id) / n for n in ("train.jsonl",
                                                                      "val.jsonl")]
            paths = [p for p in paths if p.exists()]
            delete.append(PruneItem(v.version, v.kind, v.status, tuple(map(str, paths)),
                                    sum(size_of(p) for p in paths)))
    named = {v.version for v in versions}
    orphans = sorted(d for d in (models.iterdir() if models.is_dir() else ())
                     if d.is_dir() and not d.is_symlink() and d.name.startswith(PREFIXES)
                     and d.name not in named)
    if orphans and _training_running(db):
        notes.append(f"{len(orphans)} director{'y' if len(orphans) == 1 else 'ies'} without "
                     "a model_versions row left alone: a training is running")
    else:
        for d in orphans:
            kind = "drafter" if d.name.startswith(f"{registry.PREFIX['drafter']}-") \
                else "classifier"
            delete.append(PruneItem(d.name, kind, "orphan", (str(d),), size_of(d)))
    return PrunePlan(tuple(delete), tuple(kept), tuple(notes))


def apply_prune(db, plan: PrunePlan) -> int:
    """Delete what ``plan`` lists and mark the rows pruned; returns the bytes freed."""
    freed = 0
    now = datetime.now(timezone.utc)
    for item in plan.delete:
        for p in map(Path, item.paths):
            size = size_of(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            freed += size
        if item.status != "orphan":
            with db.session() as s:
                s.execute(update(ModelVersion).where(ModelVersion.version == item.version)
                          .values(pruned_at=now))
        log.info("model version pruned", version=item.version, kind=item.kind,
                 status=item.status, mb=round(item.bytes / 1e6, 1))
    return freed


def prune(db, state_dir: Path, keep: int) -> tuple[PrunePlan, int]:
    """Plan and apply; what the retrain pipeline calls after each retrain."""
    plan = plan_prune(db, state_dir, keep)
    return plan, apply_prune(db, plan)
