"""``/healthz`` and Prometheus ``/metrics`` for the daemon.

Counters and histograms are updated by the daemon after each triage pass; gauges that
live in SQL (queue depth, teacher spend today, audit disagreement) are refreshed from the
database at most every ``refresh_s`` seconds when scraped, so a scrape costs a few cheap
queries at most. The server is a stdlib ThreadingHTTPServer on its own thread: no extra
web framework for two URLs.

>>> m = Metrics(db, epsilon=0.02)                      # doctest: +SKIP
>>> server = m.serve("127.0.0.1", 9108)                # GET /metrics, GET /healthz
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from storage.db import Database

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self, db: Database, *, epsilon: float, confidence_level: float = 0.95,
                 student_version: Callable[[], str | None] = lambda: None):
        self.db = db
        self.epsilon = epsilon
        self.level = confidence_level
        self.student_version = student_version
        self.started = time.time()
        self.last_pass = time.time()
        self.healthy_reasons: dict[str, str] = {}
        r = self.registry = CollectorRegistry()
        self.emails = Counter("understudy_emails_total", "Emails decided, by route.",
                              ["route"], registry=r)
        self.waiting = Counter("understudy_escalations_waiting_total",
                               "Escalations parked because the teacher was unavailable.",
                               registry=r)
        self.action_errors = Counter("understudy_mailbox_action_errors_total",
                                     "Mailbox actions that failed (retried later).", registry=r)
        self.audits = Counter("understudy_audits_total", "Shadow audits by the teacher.",
                              ["agree"], registry=r)
        self.latency = Histogram("understudy_triage_latency_seconds",
                                 "Claim to mailbox actions done, per email.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.pass_latency = Histogram("understudy_triage_pass_seconds",
                                      "Duration of one triage pass.", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.escalation_rate = Gauge("understudy_escalation_rate",
                                     "Share of decided emails escalated to the teacher "
                                     "since start.", registry=r)
        self.queue = Gauge("understudy_queue_depth", "Messages not yet acted on, by state.",
                           ["state"], registry=r)
        self.spend = Gauge("understudy_teacher_spend_today_usd",
                           "Teacher spend since 00:00 UTC.", registry=r)
        self.disagreement = Gauge("understudy_audit_disagreement",
                                  "Live audit disagreement rate of the active student.",
                                  ["bound"], registry=r)
        self.epsilon_g = Gauge("understudy_audit_epsilon", "Promised disagreement (epsilon).",
                               registry=r)
        self.student = Gauge("understudy_student_info", "Active student version (label).",
                             ["version"], registry=r)
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._decided = {"teacher": 0, "all": 0}

    def observe_pass(self, result: Any, seconds: float) -> None:
        """Fold one agent.worker.PassResult in."""
        self.last_pass = time.time()
        self.pass_latency.observe(seconds)
        for route, n in result.routes.items():
            self.emails.labels(route=route).inc(n)
            self._decided["all"] += n
            if route == "teacher":
                self._decided["teacher"] += n
        if self._decided["all"]:
            self.escalation_rate.set(self._decided["teacher"] / self._decided["all"])
        if result.waiting:
            self.waiting.inc(result.waiting)
        if result.action_errors:
            self.action_errors.inc(result.action_errors)
        if result.audits:
            self.audits.labels(agree="false").inc(result.audit_disagreements)
            self.audits.labels(agree="true").inc(result.audits - result.audit_disagreements)
        for s in result.latencies_s:
            self.latency.observe(s)

    def refresh(self, force: bool = False, refresh_s: float = 5.0) -> None:
        from storage.audits import audit_summary
        from storage.queries import start_of_utc_day, teacher_spend_since
        from storage.work import queue_depth

        with self._lock:
            if not force and time.time() - self._refreshed < refresh_s:
                return
            self._refreshed = time.time()
        depth = queue_depth(self.db)
        for state in ("pending", "claimed", "waiting", "decided"):
            self.queue.labels(state=state).set(depth.get(state, 0))
        self.spend.set(teacher_spend_since(self.db, start_of_utc_day()))
        version = self.student_version()
        a = audit_summary(self.db, epsilon=self.epsilon, level=self.level,
                          student_version=version)
        if a["n"]:
            self.disagreement.labels(bound="rate").set(a["rate"])
            self.disagreement.labels(bound="low").set(a["interval"][0])
            self.disagreement.labels(bound="high").set(a["interval"][1])
        self.epsilon_g.set(self.epsilon)
        self.student.clear()
        self.student.labels(version=version or "none").set(1)

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok = True
        detail: dict[str, Any] = {"uptime_s": round(time.time() - self.started, 1),
                                  "last_pass_age_s": round(time.time() - self.last_pass, 1)}
        try:
            self.db.ping()
            detail["database"] = "ok"
        except Exception as e:  # noqa: BLE001
            ok = False
            detail["database"] = f"{type(e).__name__}: {e}"
        if detail["last_pass_age_s"] > 120:      # the worker loop passes every few seconds
            ok = False
            detail["worker"] = "stalled"
        detail.update(self.healthy_reasons)
        return ok, detail

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # access logs would drown the daemon's log
                pass

            def do_GET(self):  # noqa: N802
                if self.path.startswith("/healthz"):
                    ok, detail = metrics.health()
                    body = json.dumps({"ok": ok, **detail}).encode()
                    self._reply(200 if ok else 503, body, "application/json")
                elif self.path.startswith("/metrics"):
                    try:
                        metrics.refresh()
                    except Exception:  # noqa: BLE001 - serve what we have
                        pass
                    self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found: try /healthz or /metrics\n", "text/plain")

            def _reply(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server
