"""Human-readable rendering of ``storage.queries.status_snapshot``."""

from __future__ import annotations

from typing import Any


def render_status(snap: dict[str, Any]) -> str:
    m = snap["messages"]
    t = snap["teacher"]
    states = ", ".join(f"{k} {v}" for k, v in sorted(m["by_state"].items())) or "none"
    lines = [
        f"database     {snap['database']}",
        f"messages     {m['total']} ({states}); backlog {m['backlog']}",
        f"decisions    " + (", ".join(f"{k} {v}" for k, v in sorted(
            snap["decisions_by_source"].items())) or "none"),
        f"teacher      spent ${t['spend_today_usd']:.4f} today of ${t['daily_cap_usd']:.2f} cap"
        + ("  ** PAUSED: daily spend cap reached; escalations wait **" if t["paused_by_cap"]
           else ""),
    ]
    models = snap["active_models"]
    lines.append("student      " + (", ".join(f"{x['kind']} {x['version']}" for x in models)
                                    or "none yet (cold start: the teacher decides everything)"))
    pe = snap["parse_errors"]
    lines.append(f"parse errors {pe['count']}")
    lines += [f"  #{r['id']} {r['subject']!r}: {r['error']}" for r in pe["recent"]]
    lines.append(f"model-call errors (24h) {snap['model_call_errors_24h']}")
    # --- teacher capability (issue 4): teacher failures by kind ---
    tc = snap.get("teacher_calls")
    if tc:
        lines.append(f"teacher calls today {tc['calls_today']}; failed (24h): "
                     f"{tc['invalid_answers_24h']} invalid answer(s), {tc['unavailable_24h']} "
                     f"unavailable, {tc['other_failures_24h']} other")
    lines += [f"  call #{r['id']} ({r['role']}, message {r['message_id']}): {r['error']}"
              for r in snap["recent_model_call_errors"]]
    run = snap["last_training_run"]
    if run:
        lines.append(f"last retrain #{run['id']} {run['status']} candidate={run['candidate']} "
                     f"promoted={run['promoted']}" + (f" error={run['error']}" if run["error"]
                                                       else ""))
    # --- daemon capability (issue 6): audits and the teacher backlog ---
    a = snap.get("audit")
    if a is not None:
        if a["n"]:
            lo, hi = a["interval"]
            lines.append(f"audits       {a['disagreements']}/{a['n']} disagree "
                         f"({a['rate']:.2%}, 95% interval {lo:.2%}-{hi:.2%}); promise "
                         f"epsilon {a['epsilon']:.2%}"
                         + ("  ** BREACH: disagreement above the promise **" if a["breach"]
                            else ""))
            st = a.get("settled") or {}
            if a["disagreements"]:
                open_n = a["disagreements"] - st.get("n", 0)
                lines.append(
                    f"disputes     {st.get('n', 0)} settled: the student right in "
                    f"{st.get('student_right', 0)}, the teacher in "
                    f"{st.get('teacher_right', 0)}, neither in {st.get('neither', 0)}"
                    + (f"; {open_n} to settle (`understudy review disputes`)" if open_n
                       else ""))
        else:
            lines.append(f"audits       none yet (promise epsilon {a['epsilon']:.2%})")
    w = snap.get("escalations_waiting")
    if w and w["count"]:
        lines.append(f"waiting      {w['count']} escalation(s) wait for the teacher; next try "
                     f"{w['next_attempt_at']}; last error: {w['last_error']}")
    mbs = snap.get("mailboxes") or []
    for mb in mbs:
        lines.append(f"mailbox      {mb['account']}/{mb['folder']}: {mb['messages']} stored, "
                     f"uid cursor {mb['last_uid']} (uidvalidity {mb['uidvalidity']}), "
                     f"last sync {mb['last_sync_at'] or 'never'}")
    rv = snap.get("review")
    if rv:
        lines.append(f"review       {rv['pending_review']} draft(s) wait for review"
                     + (f"; {rv['approved_undelivered']} approved but not yet in Drafts"
                        if rv["approved_undelivered"] else ""))
    return "\n".join(lines)
