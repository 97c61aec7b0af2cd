"""`retrain`, `eval` and `export-drafter`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import JsonOpt, app_context, emit, fail

EXIT_TRAINING = 5


def retrain(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Teacher-records JSONL to train from (default: the SQL log: teacher "
        "answers plus human review corrections).")] = None,
    unlabeled: Annotated[Optional[Path], typer.Option(
        "--unlabeled", help="JSONL of unlabeled emails (id, subject, body) for the assistant "
        "teacher to label (needs student.assistant_encoder; default: with --data none, "
        "else the SQL log's unlabeled mail).")] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Kill a training after this many seconds; with the assistant "
        "teacher each of its trainings has this limit too (default: no limit).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a new student from the SQL log (or --data F.jsonl), gate it and promote it.

    With student.assistant_encoder set (e.g. the directory scripts/fetch-mpnet prints) and
    at most student.assistant_max_labels training labels, a larger encoder trains on the
    same labels first and labels the unlabeled mail, whose soft labels the student learns
    too (README, The assistant teacher).

    10% of the examples are held out (from --data: the newest; from the SQL log: by a
    stable hash of the message id, among the labels made while no student handled mail
    alone; see student.validation_split): candidate and active model are compared there,
    and the candidate is promoted unless a paired sign test on the emails where the two
    differ says it is worse, on agreement or on coverage at the target risk
    (scheduler.gate_rule = "sign_test", level scheduler.gate_alpha); with gate_rule =
    "margins", unless it is worse by more than scheduler.agreement_margin or
    scheduler.coverage_margin.
    """
    from agent.build import build_drafter_step
    from distill.errors import StudentError
    from distill.pipeline import retrain as run_retrain
    from distill.pipeline import retrain_kwargs

    app = app_context(ctx)
    if unlabeled is not None and not app.settings.student.assistant_encoder:
        fail("--unlabeled needs an assistant teacher to label it: set student.assistant_encoder "
             "(e.g. UNDERSTUDY_STUDENT__ASSISTANT_ENCODER=$(scripts/fetch-mpnet))")
    db = app.database()
    try:
        # The drafter learns from the same source: the records' drafts, or the SQL log.
        step = build_drafter_step(app.settings, db, records=data)
        r = run_retrain(db, **retrain_kwargs(app.settings), data=data, trigger="manual",
                        timeout_s=timeout, unlabeled=unlabeled, after_classifier=step)
    except StudentError as e:
        fail(str(e))
    m = r.metrics or {}
    if r.status != "succeeded":
        emit(f"retrain {r.status}: {r.error} (active model unchanged)", r.to_dict(), as_json)
        raise typer.Exit(EXIT_TRAINING)
    emit(f"trained {r.version} on {r.n_examples} examples in {r.seconds:.0f}s: held-out "
         f"accuracy {m.get('accuracy', 0):.4f}, coverage {m.get('coverage', 0):.3f} at risk "
         f"{m.get('selective_risk', 0):.4f}; {'promoted' if r.promoted else 'not promoted'} "
         f"({r.gate_reason})", r.to_dict(), as_json)


def evaluate(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(
        "--data", help="Teacher-records JSONL (interchange format) to evaluate on.")],
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Model version name or version directory (default: the active "
        "classifier).")] = None,
    latency_sample: Annotated[int, typer.Option(
        help="Emails timed one at a time for the p50/p99 latency (default 200).")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a student on a teacher-records file.

    Prints accuracy against the records' category, macro-F1, ECE, coverage and selective
    risk at the stored thresholds, coverage at risk 1%, 2% and 5%, and p50/p99 latency
    per email (ms, one email per call).
    """
    from distill import registry
    from distill.classifier import Classifier
    from distill.data import read_records_file
    from distill.errors import StudentError
    from distill.evaluate import evaluate as run_eval

    app = app_context(ctx)
    st = app.settings.student
    try:
        if model and Path(model).is_dir():
            path = Path(model)
        else:
            db = app.database()
            info = registry.get_version(db, model) if model else registry.active_version(db)
            if info is None:
                fail(f"no classifier version {model!r} (`understudy models list`)" if model
                     else "no classifier has been promoted yet: run `understudy retrain`")
            if info.pruned_at:
                fail(f"{info.version}'s files were deleted by `understudy models prune` "
                     f"on {info.pruned_at:%Y-%m-%d}")
            path = Path(info.path)
        clf = Classifier.load(path, device=st.device, batch_size=st.batch_size)
        report = run_eval(clf, read_records_file(data), latency_sample=latency_sample)
    except StudentError as e:
        fail(str(e))
    c = report["coverage_at_risk"]
    lat = ("latency not measured (--latency-sample 0)" if report["latency_ms_p50"] is None
           else f"latency p50 {report['latency_ms_p50']:.1f} ms, "
           f"p99 {report['latency_ms_p99']:.1f} ms")
    emit(f"{clf.version} on {report['n']} records: accuracy {report['accuracy']:.4f}, "
         f"macro-F1 {report['macro_f1']:.4f}, ECE {report['ece']:.4f}, coverage "
         f"{report['coverage']:.3f} at risk {report['selective_risk']:.4f}; coverage at "
         f"risk 1/2/5%: {c['0.01']:.3f}/{c['0.02']:.3f}/{c['0.05']:.3f}; {lat}",
         report, as_json)


def export_drafter(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(
        help="Drafter version (a model_versions row of kind drafter, e.g. dft-20260101-"
        "120000-3fa9) or the path of a LoRA adapter directory.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Directory to write the merged model to (new, or a previous export "
        "of the same version).")],
    dtype: Annotated[str, typer.Option(
        help="Weights dtype: bfloat16 (default; what vLLM and bf16 CPUs run), float16 or "
        "float32. The merge itself is done in float32.")] = "bfloat16",
    as_json: JsonOpt = False,
) -> None:
    """Export a drafter version merged into full weights.

    The LoRA adapter is merged into the base model (student.drafter, or the base the
    version was trained on) and written as a plain safetensors model directory with the
    tokenizer and chat template: vLLM serves it with LoRA off (blue/green switch) and
    `Drafter.load(DIR)` loads it, reporting the version.
    """
    import json

    from distill.drafter import ADAPTER_META, DrafterError, export_merged

    app = app_context(ctx)
    st = app.settings.student
    if dtype not in ("bfloat16", "float16", "float32"):
        fail(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    path = Path(version)
    if path.is_dir():
        adapter, name = path, None
        meta = path / ADAPTER_META
        try:
            info = json.loads(meta.read_text()) if meta.is_file() else {}
        except ValueError:
            info = {}
        base = info.get("base") or st.drafter
    else:
        from distill import registry

        row = registry.get_version(app.database(), version)
        if row is None or row.kind != "drafter":
            what = f"a {row.kind} version" if row is not None else "not a known version"
            fail(f"{version!r} is {what} nor an adapter directory: pass a drafter version "
                 "(`understudy models list` shows them) or the path of a LoRA adapter")
        if row.pruned_at:
            fail(f"{version}'s files were deleted by `understudy models prune` on "
                 f"{row.pruned_at:%Y-%m-%d}")
        adapter, name, base = Path(row.path), row.version, row.base_model or st.drafter
    try:
        merged = export_merged(base, adapter, out, dtype=dtype)
    except (DrafterError, ValueError) as e:
        fail(str(e))
    meta = json.loads((merged / ADAPTER_META).read_text())
    emit(f"exported {meta.get('version') or name} merged into {base} ({dtype}) to {merged}",
         {"version": meta.get("version") or name, "base": base, "adapter": str(adapter),
          "out": str(merged), "dtype": dtype}, as_json)


def register(app: typer.Typer) -> None:
    app.command("retrain")(retrain)
    app.command("eval")(evaluate)
    app.command("export-drafter")(export_drafter)
