"""Helpers for the daemon's end-to-end tests and scripts/bench/e2e.

Mail comes from five Banking77 intents (a real data set; see /work/shared/data): each
test email has a unique case number in its subject, and the local Messages-API teacher
answers the gold intent of that case, so "what the teacher decided" is known exactly.
A tiny student is trained once on a disjoint slice (cached by a hash of the training code
and data, so re-runs skip it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "banking77" / "train.csv"
UNDERSTUDY = [sys.executable, "-c", "from agent.cli import main; main()"]

# intent -> (needs a reply, priority): a fixed rule, so the teacher and the student's
# training data agree on every head.
INTENTS = {
    "card_arrival": (True, "normal"),
    "exchange_rate": (False, "low"),
    "lost_or_stolen_card": (True, "urgent"),
    "top_up_failed": (True, "high"),
    "passcode_forgotten": (False, "normal"),
}
DESCRIPTIONS = {c: c.replace("_", " ") for c in INTENTS}
N_TRAIN, N_VAL = 30, 40


def _require_data() -> None:
    if not DATA.exists():
        import pytest

        pytest.skip(f"Banking77 not found at {DATA} (shared/ must sit beside the checkout)")


def bank() -> dict[str, list[str]]:
    _require_data()
    by: dict[str, list[str]] = {}
    with DATA.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["category"] in INTENTS:
                by.setdefault(r["category"], []).append(r["text"].strip())
    return by


def unseen_pool() -> list[tuple[str, str]]:
    """(text, intent) pairs the student never saw, interleaved across intents."""
    by = bank()
    rest = {c: t[N_TRAIN + N_VAL:] for c, t in by.items()}
    out, i = [], 0
    while any(i < len(v) for v in rest.values()):
        out += [(v[i], c) for c, v in rest.items() if i < len(v)]
        i += 1
    return out


class Corpus:
    """Numbered test emails; ``gold(case)`` is what the teacher answers for it."""

    def __init__(self, n: int):
        pool = unseen_pool()
        self.items = [(i, *pool[i % len(pool)]) for i in range(n)]   # (case, text, intent)

    def raw(self, case: int, domain: str = "customer.example") -> bytes:
        _, text, _ = self.items[case]
        m = EmailMessage()
        m["From"] = f"Customer {case} <c{case}@{domain}>"
        m["To"] = "support@bank.example"
        m["Subject"] = f"Case {case}: {' '.join(text.split()[:6])}"
        m["Date"] = formatdate(localtime=False)
        m["Message-ID"] = f"<case-{case}-{os.getpid()}@{domain}>"
        m.set_content(text)
        return m.as_bytes()

    def gold(self, case: int) -> dict[str, Any]:
        _, _, intent = self.items[case]
        nr, pr = INTENTS[intent]
        return {"category": intent, "needs_reply": nr, "priority": pr,
                "category_probs": {intent: 0.95,
                                   next(c for c in INTENTS if c != intent): 0.05}}

    def labeler(self, email_text: str, categories: list[str]) -> dict[str, Any]:
        m = re.search(r"Case (\d+):", email_text)
        return self.gold(int(m.group(1))) if m else {"category": categories[0]}


# ---- the tiny student ---------------------------------------------------------------------

def _cache_key() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "distill").glob("*.py")):
        h.update(p.read_bytes())
    h.update(DATA.read_bytes()[:4096])
    h.update(json.dumps([INTENTS, N_TRAIN, N_VAL]).encode())
    return h.hexdigest()[:16]


def train_tiny_student(out_root: Path | None = None, *, epochs: int = 4) -> Path:
    """A classifier version dir trained on N_TRAIN examples per intent (cached)."""
    from distill.data import LabelSpace, write_examples
    from distill.train import train
    from storage.datasets import TrainingExample

    _require_data()   # the cache key reads the data file
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "understudy" / "test-students"
    out = (out_root or cache) / f"clf-e2e-{_cache_key()}"
    if (out / "meta.json").exists() and (out / "model.safetensors").exists():
        return out
    by = bank()
    tr, va = [], []
    # No priority labels: that head stays untrained and does not vote in the router (a
    # 4-way head needs more than 150 examples to certify a threshold).
    for c, texts in by.items():
        nr, _ = INTENTS[c]
        tr += [TrainingExample(id=f"{c}-t{i}", subject="", body=t, category=c,
                               needs_reply=nr) for i, t in enumerate(texts[:N_TRAIN])]
        va += [TrainingExample(id=f"{c}-v{i}", subject="", body=t, category=c,
                               needs_reply=nr)
               for i, t in enumerate(texts[N_TRAIN:N_TRAIN + N_VAL])]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_examples(tmp / "train.jsonl", tr)
    write_examples(tmp / "val.jsonl", va)
    labels = LabelSpace(tuple(INTENTS), ("low", "normal", "high", "urgent"))
    train({"labels": labels.to_dict(), "train_path": str(tmp / "train.jsonl"),
           "val_path": str(tmp / "val.jsonl"), "out_dir": str(tmp / "model"), "epochs": epochs,
           "epsilon": 0.05, "delta": 0.1, "max_input_tokens": 64, "progress": False,
           "patience": 10})
    shutil.rmtree(out, ignore_errors=True)
    (tmp / "model").rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def activate(db, version_dir: Path, version: str | None = None) -> str:
    """Register ``version_dir`` as a classifier version and promote it (distill.registry)."""
    from distill import registry

    meta = json.loads((version_dir / "meta.json").read_text())
    version = version or version_dir.name
    registry.register(db, version, version_dir, metrics=meta.get("metrics", {}),
                      thresholds=meta["thresholds"], base_model=meta.get("base_model", ""))
    registry.promote(db, version)
    return version


# ---- config and the daemon process ---------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    raise TypeError(type(v))


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """A TOML file from a dict: scalars, tables, and ``accounts`` as an array of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items()
             if not isinstance(v, dict) and k != "accounts"]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    for acc in cfg.get("accounts", []):
        lines.append("\n[[accounts]]")
        lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in acc.items() if vv is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_config(*, dovecot, messages_api, database_url: str, **sections: Any) -> dict:
    cfg: dict[str, Any] = {
        "database_url": database_url,
        "accounts": [dovecot.account_settings("test")],
        "taxonomy": {"categories": DESCRIPTIONS},
        "teacher": {"base_url": messages_api.base_url, "max_retries": 0, "timeout_s": 10.0},
        "student": {"drafter": "none", "device": "cpu"},
        "router": {"audit_fraction": 0.05},
        "scheduler": {"enabled": False},
        "daemon": {"triage_batch": 16, "poll_interval_s": 1.0},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


class DaemonProc:
    """``understudy run`` as a real subprocess (so it can be SIGKILLed)."""

    def __init__(self, config: Path, log: Path, *args: str):
        self.config, self.log, self.args = config, log, args
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProc":
        env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT)}
        self._f = self.log.open("ab")
        self.proc = subprocess.Popen([*UNDERSTUDY, "-c", str(self.config), "run", *self.args],
                                     cwd=ROOT, env=env, stdout=self._f, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._f.close()

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._f.close()
        return rc

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate, timeout: float, every: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def imap(dovecot):
    from imapclient import IMAPClient

    c = IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=30)
    c.login(dovecot.user, dovecot.password)
    return c


def server_flags(dovecot, folder: str = "INBOX") -> dict[str, set[str]]:
    """Message-ID -> keywords on the server."""
    c = imap(dovecot)
    try:
        c.select_folder(folder, readonly=True)
        uids = c.search(["ALL"])
        got = c.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]) if uids else {}
    finally:
        c.logout()
    out = {}
    for data in got.values():
        hdr = next(v for k, v in data.items() if k.startswith(b"BODY[HEADER"))
        mid = hdr.decode().split(":", 1)[1].strip()
        out[mid] = {f.decode() if isinstance(f, bytes) else str(f) for f in data[b"FLAGS"]}
    return out


def drafts_on_server(dovecot, folder: str = "Drafts") -> list[dict[str, str]]:
    c = imap(dovecot)
    try:
        if not c.folder_exists(folder):
            return []
        c.select_folder(folder, readonly=True)
        uids = c.search(["ALL"])
        got = c.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID IN-REPLY-TO)]", "FLAGS"]) \
            if uids else {}
    finally:
        c.logout()
    out = []
    for data in got.values():
        hdr = next(v for k, v in data.items() if k.startswith(b"BODY[HEADER")).decode()
        fields = dict(re.findall(r"(?im)^([\w-]+):\s*(.+?)\s*$", hdr))
        out.append({k.lower(): v for k, v in fields.items()} | {
            "flags": " ".join(f.decode() if isinstance(f, bytes) else str(f)
                              for f in data[b"FLAGS"])})
    return out
