"""Patient-level multi-label iterative stratification (Sechidis et al., 2011).

Why our own: scikit-learn has no splitter that is both multi-label and grouped (a patient's
images must stay together), and the rare findings (Hernia: 227 of 112,120 images) must land in
every split. Shared by `data_processing` (stratified mode, and carving validation out of the
official train/val list) and the phantom generator (its official-style test list).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iterative_stratification(
    counts: np.ndarray, sizes: np.ndarray, fractions: Sequence[float], seed: int
) -> np.ndarray:
    """Assign each group (patient) to a split; return an int array of split positions.

    counts: [P, F] positives per patient and finding; sizes: [P] images per patient;
    fractions: wanted share of images per split (sums to 1). Deterministic for a seed.
    """
    counts = np.asarray(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    n_groups, n_labels = counts.shape
    n_splits = len(fractions)
    rng = np.random.default_rng(seed)
    share = np.asarray(fractions, dtype=np.float64)[:, None]
    wanted = share * counts.sum(axis=0)[None, :]  # [S, F] positives still wanted
    wanted_size = share[:, 0] * sizes.sum()  # [S] images still wanted
    positives = np.zeros((n_splits, n_labels))
    assignment = np.full(n_groups, -1, dtype=np.int64)
    has_label = counts > 0
    # A random but seeded visiting order, so ties do not always favour low patient ids.
    order = rng.permutation(n_groups)

    def place(group: int, label: int | None) -> None:
        if label is None:
            key = [(wanted_size[s], rng.random()) for s in range(n_splits)]
        else:
            key = [
                (positives[s, label] == 0, wanted[s, label], wanted_size[s], rng.random())
                for s in range(n_splits)
            ]
        split = max(range(n_splits), key=key.__getitem__)
        assignment[group] = split
        wanted[split] -= counts[group]
        wanted_size[split] -= sizes[group]
        positives[split] += counts[group]

    while True:
        open_groups = assignment[order] < 0
        remaining = has_label[order][open_groups].sum(axis=0)
        if not remaining.any():
            break
        label = int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))
        for group in order[open_groups & has_label[order, label]]:
            place(int(group), label)
    for group in order[assignment[order] < 0]:
        place(int(group), None)
    return assignment
