"""LoRA fine-tuning of the student drafter on (email, reply) pairs, loss on the reply only.

Setup -> data -> loop -> evaluation -> save, top to bottom. The result is a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors, which vLLM loads as is) plus
``understudy_drafter.json`` with the version, the resolved config and the metrics.

Early stopping: with held-out pairs, the held-out draft loss is measured before training
and every ``eval_every`` steps (default max(10, steps // 6)) and at the end; the LoRA
weights of the best check are kept in memory, training stops after ``patience`` checks
without improvement (``--patience``, default 3), and the best weights are the ones saved.
``val_loss_after`` is the loss of the saved adapter; ``best_step`` (0 = no step beat the
base, so the saved adapter is the identity), ``stopped_early`` and ``val_curve``
([step, loss] per check) say how it went.

Rationale distillation ("distilling step by step", Hsieh et al. 2023; ``rationale=True``,
``--rationale``, ``student.drafter_rationale``): pairs that carry the teacher's rationale
(one sentence on why the email is what it is) add an auxiliary example, the same email
under a different system prompt and instruction ("explain briefly why the email needs the
reply it needs", :data:`distill.drafter.RATIONALE_SYSTEM_PROMPT`) with the rationale as
target. Each step's loss is reply loss + ``rationale_weight`` (default 0.5) x rationale
loss over the same pairs. Inference only ever uses the reply prompt, so the rationale task
costs nothing at drafting time; held-out losses and early stopping are on replies only.

Where pairs come from:
  * :func:`pairs_from_sql`: teacher drafts in the model_calls log (with the teacher's
    ``rationale``), with human review edits taking precedence and rejected drafts left out;
  * :func:`pairs_from_records`: a teacher-records JSONL (interchange format, ``draft`` and
    ``rationale``);
  * :func:`pairs_from_reply_corpus`: real replies from the SpamAssassin corpus
    (``reply_pairs.jsonl``: parent and reply .eml paths), to bootstrap before any teacher.

The retrain pipeline (distill/pipeline.py) calls, in its training subprocess::

    metrics = train_drafter(pairs_from_sql(db), version_dir / "drafter",
                            base=settings.student.drafter, epochs=1, lr=2e-4, max_len=640,
                            seed=settings.student.seed, version=version)

then registers ``version_dir / "drafter"`` as a model_versions row (kind "drafter"); the
daemon loads it with ``Drafter.load(base, adapter_dir)`` or pushes it to vLLM with
``distill.serving.load_adapter``. Bootstrapping from the corpus::

    python -m distill.drafter_train --corpus ../shared/data/spamassassin --limit 400 --out DIR

Merged full weights of a trained version (for vLLM blue/green or a LoRA-free load):
``understudy export-drafter VERSION --out DIR`` (:func:`distill.drafter.export_merged`).

The same command with ``--db URL`` (or ``--records F.jsonl``) trains from the SQL log in a
child process, the way the retrain pipeline runs the classifier: a crash or kill of the
child leaves the active adapter untouched. It prints the metrics as JSON on stdout; the
held-out pairs are the newest ``--val`` (default 32), so ``val_loss_after`` against
``val_loss_before`` (or the active adapter's) is the number to gate on.
"""

from __future__ import annotations

import email
import email.policy
import json
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.drafter import (ADAPTER_META, DEFAULT_BASE, MAX_INPUT_TOKENS, cpu_has_fast_bf16,
                             generate_drafts, prompt_ids, resolve_base)
from distill.train import bar_interval
from storage.types import Email

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ReplyPair:
    """One training example: an email and the reply the student should learn to write."""

    email: Email
    reply: str
    source: str = "teacher"          # teacher | human | records | corpus
    created_at: datetime | None = None
    rationale: str | None = None     # the teacher's "why", for rationale distillation


# ---- data ----------------------------------------------------------------------------

def pairs_from_records(path: Path) -> list[ReplyPair]:
    """Records with a non-empty ``draft`` (other records carry no reply to learn)."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if (r.get("draft") or "").strip():
            em = Email(id=str(r.get("id", n)), subject=r.get("subject") or "",
                       text=r.get("body") or "", new_text=r.get("body") or "",
                       from_addr=r.get("from") or "")
            pairs.append(ReplyPair(em, r["draft"].strip(), source="records",
                                   rationale=_text(r.get("rationale"))))
    return pairs


def pairs_from_sql(db, *, since: datetime | None = None,
                   limit: int | None = None) -> list[ReplyPair]:
    """Teacher drafts from model_calls; a reviewer's final draft replaces the teacher's,
    a rejected draft removes the pair, and so does an audit disagreement settled against
    the teacher's category (``review settle``). One pair per message, oldest first.

    Each pair carries the teacher's rationale (``output["rationale"]``); after a human edit
    it is kept only if the reviewer left the category as the teacher had it (otherwise the
    rationale argues for an answer the human overruled)."""
    from sqlalchemy import select

    from storage.audits import SETTLE
    from storage.models import Message, ModelCall, Review

    by_msg: dict[int, ReplyPair] = {}
    teacher_cat: dict[int, str | None] = {}
    with db.session() as s:
        q = (select(ModelCall, Message).join(Message, ModelCall.message_id == Message.id)
             .where(ModelCall.role == "teacher", ModelCall.error.is_(None))
             .order_by(ModelCall.created_at, ModelCall.id))
        if since is not None:
            q = q.where(ModelCall.created_at >= since)
        for call, msg in s.execute(q):
            out = call.output or {}
            draft = (out.get("draft") or "").strip()
            if draft:
                by_msg[msg.id] = ReplyPair(_email_of(msg), draft, "teacher", call.created_at,
                                           rationale=_text(out.get("rationale")))
                teacher_cat[msg.id] = out.get("category")
        rq = (select(Review, Message).join(Message, Review.message_id == Message.id)
              .order_by(Review.created_at, Review.id))
        for rev, msg in s.execute(rq):
            if rev.action == "reject" or (rev.action == SETTLE and rev.category is not None
                                          and rev.category != teacher_cat.get(msg.id)):
                by_msg.pop(msg.id, None)   # a settled audit the teacher misread: its draft too
            elif (rev.final_draft or "").strip():
                prev = by_msg.get(msg.id)
                same = rev.category is None or rev.category == teacher_cat.get(msg.id)
                by_msg[msg.id] = ReplyPair(_email_of(msg), rev.final_draft.strip(), "human",
                                           rev.created_at,
                                           rationale=prev.rationale if prev and same else None)
    pairs = sorted(by_msg.values(), key=lambda p: (p.created_at is None,
                                                   p.created_at or datetime.min))
    return pairs[-limit:] if limit else pairs


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _email_of(msg) -> Email:
    return Email(id=str(msg.id), subject=msg.subject or "", text=msg.body_text or "",
                 new_text=msg.new_text or msg.body_text or "", from_addr=msg.from_addr or "",
                 db_id=msg.id)


_ATTRIBUTION = re.compile(r"^(on .{0,200}wrote:?|.{0,80} wrote:|-+ ?original message ?-+)\s*$",
                          re.I)


def new_text(body: str) -> str:
    """The text the author wrote: quoted lines, attributions, signature and list footers
    dropped (a deliberately small version of the mail parser's, for corpus files)."""
    out = []
    for line in body.splitlines():
        s = line.strip()
        if s == "--" or s.startswith("_______________"):   # signature, list footer
            break
        if s.startswith((">", "|")) or _ATTRIBUTION.match(s):
            continue
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _read_eml(path: Path) -> tuple[str, str, str]:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    part = msg.get_body(preferencelist=("plain",))
    try:
        body = part.get_content() if part is not None else ""
    except (LookupError, UnicodeDecodeError):
        body = part.get_payload(decode=True).decode("latin-1") if part is not None else ""
    return str(msg.get("subject") or ""), str(msg.get("from") or ""), body


def pairs_from_reply_corpus(corpus_dir: Path, *, limit: int | None = None,
                            min_chars: int = 20, max_chars: int = 1500) -> list[ReplyPair]:
    """(parent email, reply) from ``reply_pairs.jsonl``: replies of a sensible length only."""
    corpus_dir = Path(corpus_dir)
    pairs = []
    for line in (corpus_dir / "reply_pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        try:
            subj, frm, body = _read_eml(corpus_dir / r["parent"])
            _s, _f, reply_body = _read_eml(corpus_dir / r["reply"])
        except (OSError, KeyError, ValueError):
            continue
        reply, parent = new_text(reply_body), new_text(body)
        if not (min_chars <= len(reply) <= max_chars) or not parent:
            continue
        em = Email(id=r["parent"], subject=subj, text=body, new_text=parent, from_addr=frm)
        pairs.append(ReplyPair(em, reply, source="corpus"))
        if limit and len(pairs) >= limit:
            break
    return pairs


def encode_pair(tokenizer, pair: ReplyPair, max_len: int,
                max_input_tokens: int = MAX_INPUT_TOKENS, *,
                task: str = "reply") -> tuple[list[int], list[int]] | None:
    """input ids and labels (-100 on the prompt): the prompt is exactly what inference
    builds, the target is the reply and the end-of-turn token.

    ``task="rationale"``: the auxiliary example of rationale distillation, the same email
    under the rationale prompt with the teacher's rationale as target (None without one).
    None too when less than 4 target tokens fit in ``max_len``."""
    if task == "rationale":
        if not pair.rationale:
            return None
        text = pair.rationale
    elif task == "reply":
        text = pair.reply
    else:
        raise ValueError(f"task {task!r}: use 'reply' or 'rationale'")
    prompt = prompt_ids(tokenizer, pair.email, max_input_tokens, task=task)
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    target = (target + [tokenizer.eos_token_id])[:max(0, max_len - len(prompt))]
    if len(target) < 4:
        return None
    return prompt + target, [-100] * len(prompt) + target


# ---- training --------------------------------------------------------------------------

def _batches(rows: list[tuple[list[int], list[int]]], batch_size: int, pad: int):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)], labels[j, :len(y)], mask[j, :len(x)] = (
                torch.tensor(x), torch.tensor(y), 1)
        yield ids, mask, labels


def _loss(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the reply tokens of the batch, and how many there were.

    The 49k-word output layer runs only where there is a target (the reply): the prompt
    is most of each sequence, and its logits would be computed just to be ignored.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    where = target != -100
    logits = base.lm_head(hidden[where]).float()
    n = int(where.sum())
    return torch.nn.functional.cross_entropy(logits, target[where]), n


@torch.no_grad()
def _mean_loss(model, rows, batch_size: int, pad: int, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels in _batches(rows, batch_size, pad):
        with autocast():
            loss, n = _loss(model, ids, mask, labels)
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def train_drafter(pairs: Sequence[ReplyPair], out_dir: Path, *, base: str = DEFAULT_BASE,
                  epochs: int = 1, lr: float = 2e-4, max_len: int = 640, seed: int = 0,
                  rank: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                  batch_size: int = 4, max_steps: int | None = None,
                  val_pairs: Sequence[ReplyPair] = (), eval_limit: int = 64,
                  eval_every: int | None = None, patience: int = 3,
                  rationale: bool = False, rationale_weight: float = 0.5,
                  bf16: bool | None = None, version: str | None = None,
                  cache_dir: Path | None = None, preview: int = 0, preview_tokens: int = 48,
                  progress: bool = True, compare_adapter: Path | None = None) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on ``pairs`` and save it in ``out_dir``; return metrics.

    Metrics: ``train_loss_before``/``train_loss_after`` (mean reply-token loss on up to
    ``eval_limit`` training pairs, dropout off), ``val_loss_before``/``val_loss_after`` when
    ``val_pairs`` are given, ``steps``, ``seconds``, ``n_pairs``, ``tokens`` and, when
    ``preview`` > 0, greedy drafts (``preview_tokens`` long) of the first ``preview`` training
    emails made by the trained model in memory (fp32), for checking that the saved adapter
    reloads the same.

    Early stopping (with ``val_pairs``): the held-out loss is checked every ``eval_every``
    steps (default max(10, total steps // 6)) and after the last step; after ``patience``
    checks in a row without a new best, training stops. The best check's LoRA weights are
    restored before anything that follows training (``train_loss_after``, preview, save),
    so ``val_loss_after`` is the saved adapter's. ``best_step`` is 0 when no step beat the
    base model (the saved adapter then changes nothing). ``val_curve``: [step, loss] pairs.

    ``rationale``: add the auxiliary rationale task for pairs with a ``rationale``; the
    step loss is reply loss + ``rationale_weight`` x rationale loss (``n_rationale`` pairs).
    ``bf16``: autocast on CPUs with AMX/AVX512-bf16 and on CUDA (None = when fast).
    """
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if patience < 1:
        raise ValueError(f"patience must be >= 1, not {patience}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, not {eval_every}")
    if rationale_weight < 0:
        raise ValueError(f"rationale_weight must be >= 0, not {rationale_weight}")
    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    config = {k: v for k, v in locals().items()
              if k in ("base", "epochs", "lr", "max_len", "seed", "rank", "lora_alpha",
                       "lora_dropout", "batch_size", "max_steps", "eval_limit", "eval_every",
                       "patience", "rationale", "rationale_weight")}

    # setup: the base upcast to fp32 (LoRA weights train in fp32; bf16 only in autocast)
    src = resolve_base(base, cache_dir)
    tok = AutoTokenizer.from_pretrained(src)

    # data: (reply row, rationale row or None) per usable pair
    examples = []
    for p in pairs:
        row = encode_pair(tok, p, max_len)
        if row is not None:
            aux = encode_pair(tok, p, max_len, task="rationale") if rationale else None
            examples.append((row, aux))
    if not examples:
        raise ValueError("no usable (email, reply) pairs: every reply was empty or the "
                         "prompts filled max_len; pass pairs with drafts or raise max_len")
    rows = [r for r, _ in examples]
    n_rationale = sum(a is not None for _, a in examples)
    val_rows = [r for r in (encode_pair(tok, p, max_len) for p in val_pairs) if r is not None]

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = (dev.type == "cuda" or cpu_has_fast_bf16()) if bf16 is None else bf16
    model = get_peft_model(model.to(dev), LoraConfig(
        r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    to_dev = lambda b: tuple(t.to(dev) for t in b)  # noqa: E731
    eval_rows = rows[:eval_limit]
    metrics: dict[str, Any] = {"n_pairs": len(rows), "n_rationale": n_rationale,
                               "bf16": use_bf16, "tokens": sum(len(r[0]) for r in rows)}
    metrics["train_loss_before"] = _mean_loss(model, eval_rows, batch_size, pad, autocast)

    # loop: shuffled each epoch, linear warmup (10%) then linear decay, clipped gradients
    per_epoch = math.ceil(len(examples) / batch_size)
    total = max_steps or epochs * per_epoch
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))

    # early stopping: the check at step 0 is the base model (LoRA B starts at zero)
    every = eval_every or max(10, total // 6)
    stopper = _EarlyStop(model, patience) if val_rows else None
    if stopper is not None:
        metrics["val_loss_before"] = _mean_loss(model, val_rows, batch_size, pad, autocast)
        stopper.check(0, metrics["val_loss_before"])

    step, losses, aux_losses = 0, [], []
    bar = tqdm(total=total, desc="drafter LoRA", unit="step", disable=not progress,
               mininterval=bar_interval())
    model.train()
    while step < total and not (stopper and stopper.stopped):
        order = examples[:]
        random.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            [batch] = _batches([r for r, _ in chunk], len(chunk), pad)
            with autocast():
                loss, _n = _loss(model, *to_dev(batch))
            loss.backward()
            aux = [a for _, a in chunk if a is not None]
            if aux and rationale_weight > 0:
                # A second backward rather than one summed graph: the same gradients,
                # half the activations held at once.
                [abatch] = _batches(aux, len(aux), pad)
                with autocast():
                    aux_loss, _n = _loss(model, *to_dev(abatch))
                (rationale_weight * aux_loss).backward()
                aux_losses.append(aux_loss.item())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)   # at mininterval
            if stopper is not None and (step % every == 0 or step >= total):
                stopper.check(step, _mean_loss(model, val_rows, batch_size, pad, autocast))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{stopper.curve[-1][1]:.3f}")
                model.train()
                if stopper.stopped:
                    break
            if step >= total:
                break
    bar.close()
    if stopper is not None:
        stopper.restore()
    model.eval()

    # evaluation (of the weights that are saved)
    metrics["train_loss_after"] = _mean_loss(model, eval_rows, batch_size, pad, autocast)
    if stopper is not None:
        metrics["val_loss_after"] = stopper.best
    metrics.update(steps=step, first_step_loss=losses[0], last_step_loss=losses[-1],
                   best_step=stopper.best_step if stopper else step,
                   stopped_early=bool(stopper and stopper.stopped),
                   val_curve=stopper.curve if stopper else [])
    if aux_losses:
        metrics.update(first_rationale_loss=aux_losses[0], last_rationale_loss=aux_losses[-1])
    if compare_adapter is not None and val_rows:
        # The active adapter on the same held-out pairs: a retrain must beat what is
        # serving now, not just the base model.
        from peft import PeftModel

        active = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(dev),
            str(compare_adapter))
        metrics["val_loss_active"] = _mean_loss(active, val_rows, batch_size, pad, autocast)
        metrics["compared_with"] = str(compare_adapter)
        del active
    if preview:
        tok.padding_side = "left"
        prompts = [prompt_ids(tok, p.email) for p in pairs[:preview]]
        metrics["preview"] = [g.text for g in generate_drafts(
            model, tok, prompts, max_new_tokens=preview_tokens)]

    # save: the adapter (PEFT format) and what made it
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    meta = {"version": version or out_dir.name, "base": base, "config": config,
            "metrics": metrics, "sources": _count_sources(pairs),
            "created_at": datetime.now().astimezone().isoformat()}
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str))
    return metrics


class _EarlyStop:
    """The best held-out loss so far, a copy of the LoRA weights that reached it, patience.

    ``check`` after each evaluation; ``stopped`` once ``patience`` checks in a row did not
    beat the best (strictly lower); ``restore`` copies the best weights back in place.
    """

    def __init__(self, model, patience: int):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.patience = patience
        self.best = math.inf
        self.best_step = 0
        self.bad = 0
        self.curve: list[list[float]] = []
        self.saved: dict[str, torch.Tensor] = {}

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience

    def check(self, step: int, loss: float) -> None:
        self.curve.append([step, loss])
        if loss < self.best:
            self.best, self.best_step, self.bad = loss, step, 0
            self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self.bad += 1

    @torch.no_grad()
    def restore(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.saved[n])


def _count_sources(pairs: Sequence[ReplyPair]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.source] = counts.get(p.source, 0) + 1
    return counts


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m distill.drafter_train",
        description="Train a LoRA adapter for the student drafter on (email, reply) pairs, "
        "loss on the reply tokens only. The newest --val pairs are held out: their draft loss "
        "is checked every --eval-every steps, training stops after --patience checks without "
        "improvement, and the best weights are saved. Prints the metrics as JSON.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", type=Path, help="teacher-records JSONL with drafts")
    src.add_argument("--corpus", type=Path,
                     help="dir with reply_pairs.jsonl (e.g. ../shared/data/spamassassin)")
    src.add_argument("--db", help="database URL: teacher drafts and reviewers' edits (SQL log)")
    ap.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default {DEFAULT_BASE})")
    ap.add_argument("--limit", type=int, default=None, help="use at most N pairs (default all)")
    ap.add_argument("--val", type=int, default=32, help="pairs held out (the newest N, at most a quarter of them; default 32)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    ap.add_argument("--max-len", type=int, default=640, help="tokens per pair (default 640)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="check the held-out draft loss every N steps (default "
                         "max(10, steps // 6); needs --val > 0)")
    ap.add_argument("--patience", type=int, default=3,
                    help="early stopping: stop after N checks of the held-out loss without a "
                         "new best, and save the best weights (default 3)")
    ap.add_argument("--rationale", action="store_true",
                    help="rationale distillation: also learn the teacher's rationale (from "
                         "--db or --records) as an auxiliary task under its own prompt")
    ap.add_argument("--rationale-weight", type=float, default=0.5,
                    help="weight of the rationale loss next to the reply loss (default 0.5)")
    ap.add_argument("--version", default=None, help="version name (default: --out's name)")
    ap.add_argument("--compare-adapter", type=Path, default=None,
                    help="also report this adapter's held-out loss (val_loss_active), e.g. "
                         "the active drafter's, so a retrain is gated against it")
    args = ap.parse_args(argv)
    if args.db:
        from storage.db import Database

        pairs = pairs_from_sql(Database(args.db), limit=args.limit)   # the newest N
    elif args.records:
        pairs = pairs_from_records(args.records)
    else:
        pairs = pairs_from_reply_corpus(args.corpus, limit=args.limit)
    pairs = pairs[:args.limit] if args.limit and not args.db else pairs
    # Hold out the newest --val pairs, but never more than a quarter of what there is: a
    # first retrain on ~50 teacher drafts still gets a held-out loss to be gated on.
    n_val = min(args.val, len(pairs) // 4) if args.val else 0
    val = pairs[-n_val:] if n_val >= 2 else []
    train = pairs[:len(pairs) - len(val)]
    m = train_drafter(train, args.out, base=args.base, epochs=args.epochs, lr=args.lr,
                      max_len=args.max_len, seed=args.seed, rank=args.rank,
                      batch_size=args.batch_size, max_steps=args.max_steps, val_pairs=val,
                      eval_every=args.eval_every, patience=args.patience,
                      rationale=args.rationale, rationale_weight=args.rationale_weight,
                      version=args.version, compare_adapter=args.compare_adapter)
    print(json.dumps(m, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
