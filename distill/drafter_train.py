"""LoRA fine-tuning of the student drafter on (email, reply) pairs, loss on the reply only.

Setup -> data -> loop -> evaluation -> save, top to bottom. The result is a PEFT adapter
directory (adapter_config.json + adapter_model.safetensors, which vLLM loads as is) plus
``understudy_drafter.json`` with the version, the resolved config and the metrics.

Where pairs come from:
  * :func:`pairs_from_sql`: teacher drafts in the model_calls log, with human review
    edits taking precedence and rejected drafts left out;
  * :func:`pairs_from_records`: a teacher-records JSONL (interchange format, ``draft``);
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
                             generate_replies, prompt_ids, resolve_base)
from storage.types import Email

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ReplyPair:
    """One training example: an email and the reply the student should learn to write."""

    email: Email
    reply: str
    source: str = "teacher"          # teacher | human | records | corpus
    created_at: datetime | None = None


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
            pairs.append(ReplyPair(em, r["draft"].strip(), source="records"))
    return pairs


def pairs_from_sql(db, *, since: datetime | None = None,
                   limit: int | None = None) -> list[ReplyPair]:
    """Teacher drafts from model_calls; a reviewer's final draft replaces the teacher's,
    a rejected draft removes the pair. One pair per message, oldest first."""
    from sqlalchemy import select

    from storage.models import Message, ModelCall, Review

    by_msg: dict[int, ReplyPair] = {}
    with db.session() as s:
        q = (select(ModelCall, Message).join(Message, ModelCall.message_id == Message.id)
             .where(ModelCall.role == "teacher", ModelCall.error.is_(None))
             .order_by(ModelCall.created_at, ModelCall.id))
        if since is not None:
            q = q.where(ModelCall.created_at >= since)
        for call, msg in s.execute(q):
            draft = ((call.output or {}).get("draft") or "").strip()
            if draft:
                by_msg[msg.id] = ReplyPair(_email_of(msg), draft, "teacher", call.created_at)
        rq = (select(Review, Message).join(Message, Review.message_id == Message.id)
              .order_by(Review.created_at, Review.id))
        for rev, msg in s.execute(rq):
            if rev.action == "reject":
                by_msg.pop(msg.id, None)
            elif (rev.final_draft or "").strip():
                by_msg[msg.id] = ReplyPair(_email_of(msg), rev.final_draft.strip(), "human",
                                           rev.created_at)
    pairs = sorted(by_msg.values(), key=lambda p: (p.created_at is None,
                                                   p.created_at or datetime.min))
    return pairs[-limit:] if limit else pairs


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
                max_input_tokens: int = MAX_INPUT_TOKENS) -> tuple[list[int], list[int]] | None:
    """input ids and labels (-100 on the prompt): the prompt is exactly what inference
    builds, the target is the reply and the end-of-turn token."""
    prompt = prompt_ids(tokenizer, pair.email, max_input_tokens)
    target = tokenizer(pair.reply, add_special_tokens=False)["input_ids"]
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
                  bf16: bool | None = None, version: str | None = None,
                  cache_dir: Path | None = None, preview: int = 0, preview_tokens: int = 48,
                  progress: bool = True) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on ``pairs`` and save it in ``out_dir``; return metrics.

    Metrics: ``train_loss_before``/``train_loss_after`` (mean reply-token loss on up to
    ``eval_limit`` training pairs, dropout off), ``val_loss_before``/``val_loss_after`` when
    ``val_pairs`` are given, ``steps``, ``seconds``, ``n_pairs``, ``tokens`` and, when
    ``preview`` > 0, greedy drafts (``preview_tokens`` long) of the first ``preview`` training
    emails made by the trained model in memory (fp32), for checking that the saved adapter reloads the same.
    ``bf16``: autocast on CPUs with AMX/AVX512-bf16 and on CUDA (None = when fast).
    """
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    config = {k: v for k, v in locals().items()
              if k in ("base", "epochs", "lr", "max_len", "seed", "rank", "lora_alpha",
                       "lora_dropout", "batch_size", "max_steps", "eval_limit")}

    # setup: the base in fp32 (LoRA weights train in fp32; bf16 only inside autocast)
    src = resolve_base(base, cache_dir)
    tok = AutoTokenizer.from_pretrained(src)

    # data
    rows = [r for r in (encode_pair(tok, p, max_len) for p in pairs) if r is not None]
    if not rows:
        raise ValueError("no usable (email, reply) pairs: every reply was empty or the "
                         "prompts filled max_len; pass pairs with drafts or raise max_len")
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
    metrics: dict[str, Any] = {"n_pairs": len(rows), "bf16": use_bf16,
                               "tokens": sum(len(r[0]) for r in rows)}
    metrics["train_loss_before"] = _mean_loss(model, eval_rows, batch_size, pad, autocast)
    if val_rows:
        metrics["val_loss_before"] = _mean_loss(model, val_rows, batch_size, pad, autocast)

    # loop: shuffled each epoch, linear warmup (10%) then linear decay, clipped gradients
    per_epoch = math.ceil(len(rows) / batch_size)
    total = max_steps or epochs * per_epoch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    step, losses = 0, []
    bar = tqdm(total=total, desc="drafter LoRA", unit="step", disable=not progress)
    model.train()
    while step < total:
        order = rows[:]
        random.shuffle(order)
        for batch in _batches(order, batch_size, pad):
            with autocast():
                loss, _n = _loss(model, *to_dev(batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total:
                break
    bar.close()

    # evaluation
    metrics["train_loss_after"] = _mean_loss(model, eval_rows, batch_size, pad, autocast)
    if val_rows:
        metrics["val_loss_after"] = _mean_loss(model, val_rows, batch_size, pad, autocast)
    metrics.update(steps=step, first_step_loss=losses[0], last_step_loss=losses[-1])
    if preview:
        tok.padding_side = "left"
        prompts = [prompt_ids(tok, p.email) for p in pairs[:preview]]
        metrics["preview"] = [t for t, _c, _n in generate_replies(
            model.eval(), tok, prompts, max_new_tokens=preview_tokens)]

    # save: the adapter (PEFT format) and what made it
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    meta = {"version": version or out_dir.name, "base": base, "config": config,
            "metrics": metrics, "sources": _count_sources(pairs),
            "created_at": datetime.now().astimezone().isoformat()}
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str))
    return metrics


def _count_sources(pairs: Sequence[ReplyPair]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.source] = counts.get(p.source, 0) + 1
    return counts


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m distill.drafter_train",
                                 description="Train a LoRA adapter for the student drafter.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--records", type=Path, help="teacher-records JSONL with drafts")
    src.add_argument("--corpus", type=Path,
                     help="dir with reply_pairs.jsonl (e.g. ../shared/data/spamassassin)")
    src.add_argument("--db", help="database URL: teacher drafts and reviewers' edits (SQL log)")
    ap.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default {DEFAULT_BASE})")
    ap.add_argument("--limit", type=int, default=None, help="use at most N pairs (default all)")
    ap.add_argument("--val", type=int, default=32, help="pairs held out (the last N; default 32)")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    ap.add_argument("--max-len", type=int, default=640, help="tokens per pair (default 640)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--version", default=None, help="version name (default: --out's name)")
    args = ap.parse_args(argv)
    if args.db:
        from storage.db import Database

        pairs = pairs_from_sql(Database(args.db), limit=args.limit)   # the newest N
    elif args.records:
        pairs = pairs_from_records(args.records)
    else:
        pairs = pairs_from_reply_corpus(args.corpus, limit=args.limit)
    pairs = pairs[:args.limit] if args.limit and not args.db else pairs
    val = pairs[-args.val:] if args.val and len(pairs) > 2 * args.val else []
    train = pairs[:len(pairs) - len(val)]
    m = train_drafter(train, args.out, base=args.base, epochs=args.epochs, lr=args.lr,
                      max_len=args.max_len, seed=args.seed, rank=args.rank,
                      batch_size=args.batch_size, max_steps=args.max_steps, val_pairs=val,
                      version=args.version)
    print(json.dumps(m, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
