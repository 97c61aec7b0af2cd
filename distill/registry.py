"""Model versions: a directory under ``<state_dir>/models/<version>/`` plus a SQL row.

Statuses: ``candidate`` (trained, not promoted), ``active`` (the one the daemon serves; one
per kind), ``retired`` (was active), ``rejected`` (failed the gate). ``pruned_at`` is set
when :mod:`distill.retention` deleted a version's files; the row stays.

>>> v = new_version("classifier")                            # 'clf-20260101-120000-3fa9'
>>> register(db, v, path, metrics=m, thresholds=t, config=c)  # doctest: +SKIP
>>> promote(db, v); active_version(db).version                # doctest: +SKIP
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from distill.errors import NoActiveModel
from storage.models import ModelVersion

PREFIX = {"classifier": "clf", "drafter": "dft"}


@dataclass(frozen=True)
class VersionInfo:
    version: str
    kind: str
    path: str
    status: str
    base_model: str
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    config: dict[str, Any]
    training_run_id: int | None
    created_at: datetime | None
    promoted_at: datetime | None
    pruned_at: datetime | None = None


def _info(row: ModelVersion) -> VersionInfo:
    return VersionInfo(row.version, row.kind, row.path, row.status, row.base_model,
                       dict(row.metrics or {}), dict(row.thresholds or {}),
                       dict(row.config or {}), row.training_run_id, row.created_at,
                       row.promoted_at, row.pruned_at)


def models_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "models"


def new_version(kind: str = "classifier") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{PREFIX.get(kind, kind)}-{stamp}-{secrets.token_hex(2)}"


def version_dir(state_dir: Path, version: str) -> Path:
    return models_dir(state_dir) / version


def register(db, version: str, path: Path, *, kind: str = "classifier",
             metrics: dict | None = None, thresholds: dict | None = None,
             config: dict | None = None, base_model: str = "",
             training_run_id: int | None = None, status: str = "candidate") -> VersionInfo:
    with db.session() as s:
        row = ModelVersion(version=version, kind=kind, path=str(path), status=status,
                           base_model=base_model, metrics=metrics or {},
                           thresholds=thresholds or {}, config=config or {},
                           training_run_id=training_run_id)
        s.add(row)
        s.flush()
        return _info(row)


def get_version(db, version: str) -> VersionInfo | None:
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == version))
        return _info(row) if row else None


def list_versions(db, kind: str | None = None) -> list[VersionInfo]:
    """Every version (of ``kind``), newest first."""
    q = select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
    if kind is not None:
        q = q.where(ModelVersion.kind == kind)
    with db.session() as s:
        return [_info(r) for r in s.scalars(q)]


def active_version(db, kind: str = "classifier") -> VersionInfo | None:
    """The promoted version of ``kind``, or None before the first promotion."""
    with db.session() as s:
        row = s.scalar(select(ModelVersion)
                       .where(ModelVersion.kind == kind, ModelVersion.status == "active")
                       .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()))
        return _info(row) if row else None


def promote(db, version: str) -> VersionInfo:
    """Make ``version`` the active one of its kind; the previous active one is retired."""
    now = datetime.now(timezone.utc)
    with db.session() as s:
        row = s.scalar(select(ModelVersion).where(ModelVersion.version == version)
                       .with_for_update())
        if row is None:
            raise NoActiveModel(f"no model version {version!r}; see `understudy status`")
        s.execute(update(ModelVersion)
                  .where(ModelVersion.kind == row.kind, ModelVersion.status == "active",
                         ModelVersion.id != row.id)
                  .values(status="retired"))
        row.status, row.promoted_at = "active", now
        s.flush()
        return _info(row)


def set_status(db, version: str, status: str) -> None:
    with db.session() as s:
        s.execute(update(ModelVersion).where(ModelVersion.version == version)
                  .values(status=status))


def load_active_classifier(db, device: str = "auto", batch_size: int = 32):
    """The active classifier, loaded; raises :class:`NoActiveModel` before the first one."""
    from distill.classifier import Classifier

    info = active_version(db, "classifier")
    if info is None:
        raise NoActiveModel("no classifier has been promoted yet: run `understudy retrain` "
                            "(or `understudy retrain --data teacher.jsonl`)")
    return Classifier.load(info.path, device=device, batch_size=batch_size)
