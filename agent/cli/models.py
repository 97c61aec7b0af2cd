"""`models list|promote|prune`: the versions retrain made, rolling back, disk space."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import JsonOpt, app_context, emit, fail

models_app = typer.Typer(
    help="Model versions: list them, promote one by hand (roll back), delete old files.",
    no_args_is_help=True)

KINDS = ("classifier", "drafter")


def _kind(kind: Optional[str]) -> Optional[str]:
    if kind is not None and kind not in KINDS:
        fail(f"--kind {kind!r}: use classifier or drafter")
    return kind


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"


def _quality(v) -> str:
    """One cell: what the gate compared (classifier) or the held-out draft loss (drafter)."""
    m = v.metrics
    if v.kind == "classifier":
        h = m.get("holdout") or {}
        if "accuracy" not in h:
            return "-"
        return f"acc {h['accuracy']:.3f} cov {h.get('coverage', 0.0):.3f}"
    loss = m.get("val_loss_after")
    return f"val loss {loss:.3f}" if isinstance(loss, (int, float)) else "-"


@models_app.command("list")
def list_models(
    ctx: typer.Context,
    kind: Annotated[Optional[str], typer.Option(
        help="classifier or drafter (default: both).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every model version, newest first: status, when it was made and promoted, what the
    gate measured on held-out mail, and its size on disk ("pruned": files deleted)."""
    from distill import registry
    from distill.retention import size_of

    versions = registry.list_versions(app_context(ctx).database(), _kind(kind))
    rows = []
    for v in versions:
        size = None if v.pruned_at else size_of(Path(v.path))
        rows.append({"version": v.version, "kind": v.kind, "status": v.status,
                     "created_at": v.created_at, "promoted_at": v.promoted_at,
                     "pruned_at": v.pruned_at, "path": v.path, "bytes": size,
                     "holdout": v.metrics.get("holdout") if v.kind == "classifier" else None,
                     "quality": _quality(v)})
    total = sum(r["bytes"] or 0 for r in rows)
    if as_json:
        emit("", {"versions": rows, "bytes": total}, True)
        return
    if not rows:
        typer.echo("no model versions yet: `understudy retrain` makes the first")
        return
    typer.echo(f"{'VERSION':28} {'KIND':10} {'STATUS':8} {'CREATED':16} {'PROMOTED':16} "
               f"{'HELD-OUT':22} {'SIZE':>8}")
    for r in rows:
        size = "pruned" if r["pruned_at"] else f"{(r['bytes'] or 0) / 1e6:.0f} MB"
        typer.echo(f"{r['version']:28} {r['kind']:10} {r['status']:8} "
                   f"{_when(r['created_at']):16} {_when(r['promoted_at']):16} "
                   f"{r['quality']:22} {size:>8}")
    typer.echo(f"{len(rows)} version(s), {total / 1e6:.0f} MB on disk")


def _loadable(v) -> str | None:
    """Why the version's files cannot serve, or None."""
    from distill import classifier, drafter

    path = Path(v.path)
    if v.pruned_at:
        return f"its files were deleted by `understudy models prune` on {_when(v.pruned_at)}"
    missing = (classifier if v.kind == "classifier" else drafter).missing_files(path)
    if missing:
        return f"{path} lacks {', '.join(missing)}"
    return None


@models_app.command("promote")
def promote_model(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(
        help="The version to serve, e.g. clf-20260101-120000-3fa9 (`understudy models "
        "list`).")],
    force: Annotated[bool, typer.Option(
        "--force", help="Also promote a version the gate rejected.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the active model of its kind (a rollback, or a version held back).

    The version that was active is retired. A running daemon picks the change up within
    seconds (no restart). The promotion gate is not consulted: a version it rejected needs
    --force. The next retrain compares its candidate with this version.
    """
    import structlog

    from distill import registry

    db = app_context(ctx).database()
    v = registry.get_version(db, version)
    if v is None:
        fail(f"no model version {version!r}; `understudy models list` shows them")
    if v.status == "active":
        emit(f"{version} is already the active {v.kind}",
             {"version": version, "kind": v.kind, "promoted": False, "previous": version},
             as_json)
        return
    why = _loadable(v)
    if why:
        fail(f"cannot promote {version}: {why}")
    if v.status == "rejected" and not force:
        fail(f"{version} was rejected by the promotion gate (`understudy models list`); "
             "pass --force to promote it anyway")
    before = registry.active_version(db, v.kind)
    registry.promote(db, version)
    structlog.get_logger(__name__).info(
        "model promoted by hand", version=version, kind=v.kind,
        previous=before.version if before else None, was=v.status)
    emit(f"{version} is now the active {v.kind}"
         + (f" ({before.version} retired)" if before else ""),
         {"version": version, "kind": v.kind, "promoted": True,
          "previous": before.version if before else None}, as_json)


@models_app.command("prune")
def prune_models(
    ctx: typer.Context,
    keep: Annotated[Optional[int], typer.Option(
        min=0, help="Versions to keep per kind besides the active one and the last retired "
        "one (default: scheduler.keep_versions, 5).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only list what would be deleted.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete the files of old model versions to free disk space.

    Per kind, keeps the active version, the last retired one (the rollback target) and the
    KEEP newest others; deletes the rest's directories (and their training-data copies
    under runs/), and directories no version row names (failed or killed trainings) unless
    a training is running. Rows and metrics stay; `models list` shows them as pruned. The
    daemon does this after each retrain (scheduler.prune_after_retrain).
    """
    from distill.retention import apply_prune, plan_prune

    app = app_context(ctx)
    keep = app.settings.scheduler.keep_versions if keep is None else keep
    db = app.database()
    plan = plan_prune(db, app.settings.state_dir, keep)
    freed = 0 if dry_run else apply_prune(db, plan)
    items = [{"version": i.version, "kind": i.kind, "status": i.status, "bytes": i.bytes,
              "paths": list(i.paths)} for i in plan.delete]
    if as_json:
        emit("", {"dry_run": dry_run, "keep": keep, "deleted": items, "kept": list(plan.kept),
                  "notes": list(plan.notes), "bytes": plan.bytes if dry_run else freed}, True)
        return
    verb = "would delete" if dry_run else "deleted"
    for i in plan.delete:
        typer.echo(f"{verb} {i.version} ({i.kind}, {i.status}, {i.bytes / 1e6:.0f} MB)")
    for note in plan.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"{verb} {len(items)} version(s), {(plan.bytes if dry_run else freed) / 1e6:.0f}"
               f" MB; kept {len(plan.kept)} (keep {keep} per kind besides the active and the "
               "last retired one)")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
