"""`teacher label` and `dataset import|export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import EXIT_CONFIG, EXIT_UNAVAILABLE, JsonOpt, app_context, emit, fail

teacher_app = typer.Typer(help="Ask the teacher to label pending mail.", no_args_is_help=True)
dataset_app = typer.Typer(help="Import and export teacher records (JSONL).",
                          no_args_is_help=True)


@teacher_app.command("label")
def teacher_label(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(
        help="Label at most this many emails, oldest first (default 100).", min=1)] = 100,
    batch: Annotated[bool, typer.Option(
        "--batch", help="Backfill through the Message Batches API: half price, answers "
        "within 24 h; the command waits, polling (default: off, one call per email).")] = False,
    poll_interval: Annotated[float, typer.Option(
        help="Seconds between batch status polls (default 30).", min=0.0)] = 30.0,
    max_wait: Annotated[float, typer.Option(
        help="Stop waiting for a batch after this many seconds (default 86400); the next "
        "run collects it without paying again.", min=0.0)] = 86400.0,
    dry_run: Annotated[Optional[int], typer.Option(
        "--dry-run", metavar="N", help="Print the estimated cost (USD) of labelling the next N "
        "pending emails and spend nothing.", min=1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Label stored emails that have no teacher answer yet; every call becomes a model_calls row.

    The labels are training data: decisions and mailbox actions stay with the daemon.
    """
    from agent.teacher import estimate_cost, taxonomy_of
    from agent.teacher.base import prompt_tokens
    from agent.teacher.pricing import MIN_CACHEABLE_TOKENS
    from storage.records import unlabelled_stats

    app = app_context(ctx)
    settings, db = app.settings, app.database()
    t = settings.teacher
    if dry_run is not None:
        n, avg = unlabelled_stats(db, dry_run)
        fixed = prompt_tokens(taxonomy_of(settings))
        usd = estimate_cost(n, avg, t.price_table, k=t.self_consistency_k, batch=batch,
                            system_tokens=fixed, cached_system=fixed >= MIN_CACHEABLE_TOKENS) \
            if t.backend == "anthropic" else 0.0
        emit(f"would label {n} email(s) (mean {avg:.0f} chars) with {t.backend}:{t.model}"
             f"{' via batches' if batch else ''}: about ${usd:.4f}; nothing was sent",
             {"emails": n, "avg_chars": round(avg, 1), "estimated_usd": round(usd, 6),
              "backend": t.backend, "model": t.model, "batch": batch,
              "k": t.self_consistency_k, "prompt_tokens": fixed,
              "prices_per_mtok": t.price_table.model_dump()}, as_json)
        return
    _label(settings, db, limit, batch, poll_interval, max_wait, as_json)


def _label(settings, db, limit: int, batch: bool, poll_interval: float, max_wait: float,
           as_json: bool) -> None:
    from agent.teacher import TeacherConfigError, build_teacher
    from agent.teacher.backfill import backfill

    try:
        teacher = build_teacher(settings, db)
    except TeacherConfigError as e:
        fail(str(e), EXIT_CONFIG)
    if batch and not hasattr(teacher, "label_batch"):
        fail(f"--batch needs the anthropic backend, not {settings.teacher.backend}", EXIT_CONFIG)
    rep = backfill(teacher, db, limit=limit, batch=batch, poll_interval_s=poll_interval,
                   max_wait_s=max_wait)
    data = {**rep.as_dict(), "batch": batch}
    summary = (f"labelled {rep.labelled} of {rep.requested} email(s), {rep.failed} failed, "
               f"${rep.cost_usd:.4f}"
               + (f"; collected earlier batch(es) {', '.join(rep.collected_batches)}"
                  if rep.collected_batches else "")
               + (f"; still processing: {', '.join(rep.pending_batches)} (run again later)"
                  if rep.pending_batches else "")
               + (f"; stopped: {rep.stopped}" if rep.stopped else ""))
    emit(summary, data, as_json)
    if rep.stopped:
        raise typer.Exit(EXIT_UNAVAILABLE)


@dataset_app.command("import")
def dataset_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="Teacher-records JSONL (id, body, category "
                                         "required on every line).")],
    as_json: JsonOpt = False,
) -> None:
    """Import a teacher-records JSONL file as labelled emails (already-imported ids are skipped).

    The whole file is validated first: a bad line aborts the import and names the line.
    """
    from agent.teacher import RecordsFormatError, read_records
    from storage.records import import_records

    app = app_context(ctx)
    db = app.database()
    try:
        records = [r.to_dict() for r in read_records(file)]
    except RecordsFormatError as e:
        fail(str(e), EXIT_CONFIG)
    known = set(app.settings.taxonomy.categories)
    outside = sorted({r["category"] for r in records} - known)
    if outside:
        # Imported anyway (the file may belong to another taxonomy), but the student
        # trains on the configured one: say so.
        typer.echo(f"warning: {len(outside)} categor(y/ies) not in the configured taxonomy: "
                   f"{', '.join(outside[:10])}{' ...' if len(outside) > 10 else ''}", err=True)
    stats = import_records(db, records, source=file.name)
    emit(f"imported {stats.imported} record(s) from {file} ({stats.skipped_existing} already "
         f"present, {stats.gold} gold)",
         {"file": str(file), "imported": stats.imported,
          "skipped_existing": stats.skipped_existing, "gold": stats.gold,
          "categories_outside_taxonomy": outside}, as_json)


@dataset_app.command("export")
def dataset_export(
    ctx: typer.Context,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write here (default: JSONL on stdout).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Only the newest N records (default: all).", min=1)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export teacher answers, corrected by gold review labels, as teacher-records JSONL."""
    import json

    from agent.teacher import TeacherRecord, write_records
    from storage.records import export_records

    from agent.teacher import RecordsFormatError

    db = app_context(ctx).database()
    records, skipped = [], []
    for r in export_records(db, limit=limit):
        try:
            records.append(TeacherRecord.from_dict(r, f"message {r['id']}"))
        except RecordsFormatError as e:      # e.g. a stored soft label that does not sum up
            skipped.append(str(e))
    for problem in skipped[:5]:
        typer.echo(f"warning: skipped {problem}", err=True)
    gold = sum(r.source == "human" for r in records)
    if out is None:
        for r in records:
            sys.stdout.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        typer.echo(f"exported {len(records)} record(s) ({gold} gold)", err=True)
        return
    n = write_records(out, records)
    emit(f"exported {n} record(s) to {out} ({gold} gold, {len(skipped)} skipped)",
         {"file": str(out), "records": n, "gold": gold, "skipped": len(skipped)}, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")
    app.add_typer(dataset_app, name="dataset")
