"""Validation metrics computed during training (the reporting pipeline does the full analysis).

Macro AUROC is the early-stopping criterion: threshold-free and not fooled by the ~92 %
all-negative accuracy. Findings with a single class in the validation split have no AUROC
(NaN in the history) and are left out of the macro mean rather than counted as 0 or 0.5.
ACC/Recall/Precision/F1 at 0.5 are macro means over findings (the paper's numbers, as a trace).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from rare_cxr.findings import FINDINGS


def validation_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """History columns `val_macro_auroc`, `val_auroc_<finding>`, `val_acc/recall/precision/f1`."""
    out: dict[str, float] = {"val_macro_auroc": float("nan")}  # first, as in the contract
    aurocs = []
    for k, name in enumerate(FINDINGS):
        y = labels[:, k]
        if y.min() == y.max():
            auc = float("nan")
        else:
            auc = float(roc_auc_score(y, probs[:, k]))
            aurocs.append(auc)
        out[f"val_auroc_{name}"] = auc
    out["val_macro_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
    pred = (probs >= 0.5).astype(np.int64)
    truth = labels.astype(np.int64)
    out["val_acc"] = float((pred == truth).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["val_recall"] = float(recall_score(truth, pred, average="macro", zero_division=0))
        out["val_precision"] = float(precision_score(truth, pred, average="macro", zero_division=0))
        out["val_f1"] = float(f1_score(truth, pred, average="macro", zero_division=0))
    return out
