"""`simulate` (replay a labelled stream through the cascade) and `report` (HTML)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import JsonOpt, app_context, emit, fail


def simulate(
    ctx: typer.Context,
    stream: Annotated[Path, typer.Option(
        help="Teacher-records JSONL replayed in file order as arriving mail (required).")],
    test: Annotated[Path, typer.Option(
        help="Held-out teacher-records JSONL to evaluate the final student and cascade on.")],
    retrain_every: Annotated[int, typer.Option(
        min=10, help="Retrain (real gate) after every N stream emails. Default 1000.")] = 1000,
    risk: Annotated[Optional[float], typer.Option(
        help="Target risk ε for the student's thresholds (default: router.target_risk, 0.02).")
    ] = None,
    audit_fraction: Annotated[Optional[float], typer.Option(
        help="Share of student-handled mail audited by the teacher in shadow "
             "(default: router.audit_fraction, 0.03).")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        help="Training epochs per retrain (default: student.epochs).")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Isolated state dir for the replay's database and models "
             "(default: <state_dir>/simulations/<timestamp>). Must be empty or absent.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Also write the run's JSON here, after every retrain (partial) and at the end "
             "(input to `understudy report --from-simulation`). Default: <work-dir>/run.json."
    )] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Replay only the first N stream emails (default: all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay a teacher-records stream through the real cascade and evaluate it.

    Emails are fed in file order, with no IMAP, through the real student, router and
    retraining (real promotion gate) in an isolated state dir; escalations and audits are
    answered by a recorded teacher (the stream's own labels) and priced at the configured
    Claude prices. Progress per retrain goes to stderr.
    """
    from agent.simulate.data import SimulationDataError
    from agent.simulate.build import run_simulation_from_settings
    from agent.simulate.engine import SimulationError
    from agent.teacher.errors import RecordsFormatError

    settings = app_context(ctx).settings
    if settings.log_level != "debug":
        # The worker logs every decision at info; thousands of lines would bury the
        # per-retrain progress this command prints on stderr.
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = run_simulation_from_settings(
            settings, stream=stream, test=test, retrain_every=retrain_every, risk=risk,
            audit_fraction=audit_fraction, epochs=epochs, work_dir=work_dir, limit=limit,
            out=out, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (SimulationDataError, SimulationError, RecordsFormatError) as e:
        fail(str(e))
    path = result["run_json"]
    t, c, s, k = result["teacher"], result["cost"], result["student"], result["cascade"]
    emit(f"simulated {result['n_stream']} emails: teacher {t['calls']} calls "
         f"({_pct(t['share'])}), cost ${c['blended_usd']:.4f} vs ${c['teacher_only_usd']:.4f} "
         f"teacher-only (ratio {_num(c['ratio'])}), cascade accuracy "
         f"{_pct(k['stream_accuracy'])} (stream) {_pct(k['test_accuracy'])} (test), student "
         f"{s['version'] or 'none'} coverage {_pct(s['test_coverage'])} at risk "
         f"{_pct(s['test_risk'], 2)} (in hindsight {_pct(s.get('test_hindsight_coverage'))} "
         f"at {_pct(s.get('epsilon'))}); run: {path}", result, as_json)


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def report(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="HTML file to write. Default: report.html.")] = Path("report.html"),
    from_simulation: Annotated[Optional[Path], typer.Option(
        help="Build the report from a simulate run's JSON instead of the database.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML report (plots embedded) from the database or a run.

    Panels: mail by route over time, escalation rate, audit disagreement with its 95%
    interval, coverage-risk of the active model, confusion matrix, teacher spend and
    savings, latency percentiles. Panels without data say "no data yet".
    """
    from agent.report import collect_from_db, write_report
    from agent.report.from_simulation import collect_from_simulation, load_run
    from agent.simulate.data import SimulationDataError

    if from_simulation is not None:
        try:
            data = collect_from_simulation(load_run(from_simulation),
                                           source=f"simulate run {from_simulation}")
        except SimulationDataError as e:
            fail(str(e))
        xlabel = "stream emails"
    else:
        actx = app_context(ctx)
        data = collect_from_db(actx.database(), epsilon=actx.settings.router.target_risk,
                               price_table=actx.settings.teacher.price_table)
        xlabel = "time (UTC)"
    path = write_report(data, out, xlabel=xlabel)
    summary = {k: v for k, v in data.summary.items()}
    emit(f"report written to {path} ({path.stat().st_size // 1024} KiB, {data.source})",
         {"out": str(path), "bytes": path.stat().st_size, "source": data.source,
          "summary": summary}, as_json)


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("report")(report)
