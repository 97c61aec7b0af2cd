"""The student's lexical view: TF-IDF n-grams and a logistic regression per head, mixed into
the probabilities after the memory.

The classifier and the memory both read an email through MiniLM. A bag of word and
character n-grams reads it differently: it keys on the exact words (a product name, "PIN",
"exchange rate") and errs on other emails than the encoder does. Alone it is the weaker
model (Banking77: 89.6% against the student's 91.7% with all labels, 66.6% against 83.7%
with ten per intent), but mixed in it ranks emails by confidence better, which is what the
certified threshold pays for, for students trained on a records file: the certified
coverage at 2% risk went from 75.0% to 77.5% of validation (77.7% to 80.2% of the
holdout, at 0.62% risk) with all labels and from 40.0% to 42.5% (37.2% to 41.8% of the
test file) with ten per intent. Not in the replay, whose students train on the SQL log
(mostly escalated mail): in three replays its final students were as good or better, but its
first student (1,000 labels) certified nothing each time, and the teacher's share of the
stream moved by -0.2, +1.5 and +0.8 points. So it is off by default (``student.
lexical_weight`` 0; README, Lexical view; ``scripts/bench/lexical``).

Per head: ``p = (1 - w) * p_student + w * lexical``, then a temperature fitted on
validation; ``p_student`` is the calibrated, memory-mixed probability, and thresholds are
certified on the result. Features: word 1-2-grams and character 2-5-grams within words
(those in at least two training emails), sublinear TF, IDF, L2-normalised, at most 50,000
of each, from the first ``max_chars`` characters (training passes 4 per token of the
student's input budget, 512 for 128: about what the encoder reads); a multinomial logistic
regression with C = 10. Saved without pickle: vocabularies and settings in ``lexical.json``, IDF and
weights in ``lexical.safetensors``.

>>> lex = Lexical.fit(texts, {"category": y}, {"category": 77}, weight=0.3)  # doctest: +SKIP
>>> p = lex.mix(probs, lex.probabilities(texts)["category"], "category")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distill.calibrate import mix_views

LEXICAL_FILE = "lexical.safetensors"
LEXICAL_META = "lexical.json"
FEATURES = {"word": dict(analyzer="word", ngram_range=(1, 2), min_df=1),
            "char": dict(analyzer="char_wb", ngram_range=(2, 5), min_df=2)}
COMMON = dict(sublinear_tf=True, lowercase=True, max_features=50_000)


class Lexical:
    def __init__(self, vocabularies: dict[str, dict[str, int]], idf: dict[str, np.ndarray],
                 heads: dict[str, dict], *, weight: float = 0.3, max_chars: int = 512,
                 temperatures: dict[str, float] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizers = {}
        for name, vocab in vocabularies.items():
            v = TfidfVectorizer(**FEATURES[name], **COMMON, vocabulary=vocab,
                                dtype=np.float32)
            v.idf_ = idf[name]
            self.vectorizers[name] = v
        # head -> {"coef": (C_seen, F), "intercept": (C_seen,), "classes": (C_seen,) index
        # into the head's classes, "n_classes": C}
        self.heads = heads
        # Per feature block, (F_block, C_seen) contiguous: each block's sparse rows multiply
        # their slice (no stacking per call; a transposed view would be copied per call).
        sizes = [len(v.vocabulary_) for v in self.vectorizers.values()]
        bounds = np.cumsum([0, *sizes])
        self._coef_t = {h: [np.ascontiguousarray(v["coef"][:, a:b].T)
                            for a, b in zip(bounds[:-1], bounds[1:])]
                        for h, v in heads.items()}
        self.weight, self.max_chars = weight, max_chars
        self.temperatures = dict(temperatures or {})

    @classmethod
    def fit(cls, texts: Sequence[str], labels: dict[str, np.ndarray],
            n_classes: dict[str, int], *, sample_weight: np.ndarray | None = None,
            weight: float = 0.3, max_chars: int = 512, c: float = 10.0) -> "Lexical | None":
        """Fit the features on ``texts`` and one regression per head on its labels (class
        indices, negative: no label). None when no head has two classes to tell apart."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        docs = [t[:max_chars] for t in texts]
        vocabularies, idf, blocks = {}, {}, []
        for name, spec in FEATURES.items():
            v = TfidfVectorizer(**spec, **COMMON, dtype=np.float32)
            try:
                blocks.append(v.fit_transform(docs))
            except ValueError:   # too few texts for min_df: no such features
                continue
            vocabularies[name] = {t: int(i) for t, i in v.vocabulary_.items()}
            idf[name] = v.idf_.astype(np.float32)
        if not blocks:
            return None
        from scipy.sparse import hstack

        x = hstack(blocks).tocsr()
        heads = {}
        for head, y in labels.items():
            y = np.asarray(y)
            keep = y >= 0
            if len(np.unique(y[keep])) < 2:
                continue
            sw = None if sample_weight is None else np.asarray(sample_weight)[keep]
            with warnings.catch_warnings():   # a cap on iterations is fine for a second view
                warnings.simplefilter("ignore")
                lr = LogisticRegression(C=c, max_iter=2000).fit(x[keep], y[keep],
                                                                sample_weight=sw)
            heads[head] = {"coef": lr.coef_.astype(np.float32),
                           "intercept": lr.intercept_.astype(np.float32),
                           "classes": lr.classes_.astype(np.int64),
                           "n_classes": int(n_classes[head])}
            if len(lr.classes_) == 2:   # one row, the odds of the second class: softmax
                h = heads[head]             # over (0, z) is its sigmoid
                h["coef"] = np.vstack([np.zeros_like(h["coef"]), h["coef"]])
                h["intercept"] = np.concatenate([np.zeros_like(h["intercept"]),
                                                 h["intercept"]])
        if not heads:
            return None
        return cls(vocabularies, idf, heads, weight=weight, max_chars=max_chars)

    def probabilities(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """(N, classes) per head; classes no training email had get 0."""
        docs = [t[:self.max_chars] for t in texts]
        blocks = [v.transform(docs) for v in self.vectorizers.values()]
        out = {}
        for head, h in self.heads.items():
            z = h["intercept"] + sum(np.asarray(x @ w) for x, w in zip(blocks, self._coef_t[head]))
            logits = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
            p = torch.zeros(len(docs), h["n_classes"])
            p[:, torch.from_numpy(h["classes"])] = torch.softmax(logits.float(), -1)
            out[head] = p
        return out

    def mix(self, probs: torch.Tensor, lexical: torch.Tensor | None, head: str,
            temperature: float | None = None) -> torch.Tensor:
        """The mixed, recalibrated probabilities of one head (``probs``: what the student
        serves without this view)."""
        if lexical is None or head not in self.heads:
            return probs
        t = self.temperatures.get(head, 1.0) if temperature is None else temperature
        return mix_views(probs, lexical, self.weight, t)

    # ---- files ------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {f"idf.{n}": np.ascontiguousarray(v.idf_, dtype=np.float32)
                   for n, v in self.vectorizers.items()}
        for head, h in self.heads.items():
            for k in ("coef", "intercept", "classes"):
                tensors[f"{head}.{k}"] = np.ascontiguousarray(h[k])
        save_file(tensors, str(Path(out_dir) / LEXICAL_FILE))
        (Path(out_dir) / LEXICAL_META).write_text(json.dumps({
            "weight": self.weight, "max_chars": self.max_chars,
            "temperatures": self.temperatures,
            "n_classes": {h: v["n_classes"] for h, v in self.heads.items()},
            "vocabularies": {n: {t: int(i) for t, i in v.vocabulary_.items()}
                             for n, v in self.vectorizers.items()}}))

    @classmethod
    def load(cls, out_dir: Path) -> "Lexical | None":
        """The lexical view saved next to a classifier, or None (trained without one)."""
        from safetensors.numpy import load_file

        d = Path(out_dir)
        if not (d / LEXICAL_FILE).exists():
            return None
        meta = json.loads((d / LEXICAL_META).read_text())
        t = load_file(str(d / LEXICAL_FILE))
        heads = {h: {"coef": t[f"{h}.coef"], "intercept": t[f"{h}.intercept"],
                     "classes": t[f"{h}.classes"], "n_classes": n}
                 for h, n in meta["n_classes"].items()}
        return cls(meta["vocabularies"], {n: t[f"idf.{n}"] for n in meta["vocabularies"]},
                   heads, weight=meta["weight"], max_chars=meta["max_chars"],
                   temperatures=meta["temperatures"])
