"""`run` (the daemon) and `triage` (one pass)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from agent.cli.common import JsonOpt, app_context, emit, fail


def run(
    ctx: typer.Context,
    worker_id: Annotated[Optional[str], typer.Option(
        help="Name of this worker in claims and leases (default: daemon.worker_id, else "
             "HOST:PID).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="Serve /healthz and /metrics on 127.0.0.1:PORT (default: daemon.metrics_port; "
             "off when unset).")] = None,
    lease_ttl_s: Annotated[float, typer.Option(
        "--lease-ttl-s", help="Seconds a folder lease and a worker heartbeat stay valid "
        "without renewal; a dead daemon's folders and claims move on after this (default "
        "30).")] = 30.0,
    no_scheduler: Annotated[bool, typer.Option(
        "--no-scheduler", help="Do not run scheduled retraining in this process "
        "(default: run it when scheduler.enabled).")] = False,
) -> None:
    """Run the daemon: IDLE watchers per folder, the triage worker, scheduled retraining.

    Stops cleanly on SIGTERM/SIGINT (finishes the current pass, releases claims and folder
    leases) and exits 0. Several daemons may share one PostgreSQL database; SQLite allows
    one.
    """
    import signal
    import threading

    # A SIGTERM that arrives while the daemon is still being built (imports, database,
    # metrics port) is a clean stop too: nothing is held yet, so exit 0 right after.
    early_stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: early_stop.set())

    from agent.daemon import DaemonError
    from agent.build import build_daemon

    actx = app_context(ctx)
    db = actx.database()
    try:
        daemon = build_daemon(actx.settings, db, worker_id=worker_id,
                              metrics_port=metrics_port, scheduler=not no_scheduler,
                              lease_ttl_s=lease_ttl_s, heartbeat_s=max(0.5, lease_ttl_s / 10))
        if early_stop.is_set():
            emit("stopped before start", None)
            raise typer.Exit(0)
        code = daemon.run()
    except DaemonError as e:
        fail(str(e))
    raise typer.Exit(code)


def triage(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(
        help="Stop after about this many emails (default 0: until nothing is due).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Triage pending mail once (classify, route, teacher, commit, mailbox actions), then exit.

    Escalations that cannot reach the teacher wait (state 'waiting') and are not counted as
    decided; `understudy status` shows them.
    """
    from agent.build import build_worker, worker_identity
    from storage import work

    actx = app_context(ctx)
    s = actx.settings
    db = actx.database()
    wid = worker_identity(s)
    if db.dialect != "postgresql":
        # SQLite has one worker; whatever a dead process claimed is ours to hand back.
        work.recover_stale_claims(db, 30.0, alive={wid})
    work.heartbeat(db, wid)
    worker = build_worker(s, db, worker_id=wid)
    try:
        if limit:
            from agent.worker import PassResult, _add

            total = PassResult()
            while total.claimed < limit:
                r = worker.run_once()
                _add(total, r)
                if not r.claimed:
                    break
        else:
            total = worker.run_until_empty()
    finally:
        worker.release_all()
        work.drop_heartbeat(db, wid)
    decided = sum(total.routes.values())
    data = {"claimed": total.claimed, "decided": decided, "routes": total.routes,
            "waiting": total.waiting, "acted": total.acted,
            "action_errors": total.action_errors, "audits": total.audits,
            "audit_disagreements": total.audit_disagreements,
            "teacher_cost_usd": round(total.teacher_cost_usd, 6)}
    routes = ", ".join(f"{k} {v}" for k, v in sorted(total.routes.items())) or "none"
    emit(f"triaged {decided} email(s) ({routes}); {total.waiting} waiting for the teacher; "
         f"{total.acted} acted on; {total.action_errors} mailbox action error(s)",
         data, as_json)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("triage")(triage)
