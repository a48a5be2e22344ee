"""Next-token selection from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from batch.infer.settings import check_sampling


def _as_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("logits contain NaN")
    return x


def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties at the cut-off going to the lowest indices, in index order."""
    threshold = np.partition(x, x.size - k)[x.size - k]
    above = np.flatnonzero(x > threshold)
    tied = np.flatnonzero(x == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, tied]))


def make_sampler(
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
) -> Callable[[np.ndarray], int]:
    """Return a function that picks a token id from a 1-D logits array.

    temperature <= 0 is greedy (argmax, ties to the lowest index). Otherwise logits are divided by
    temperature, cut to the top_k best (0 = off), then to the smallest set of best tokens whose probability
    adds up to at least top_p (1 = off, never fewer than one token), and a token is drawn from the softmax of
    what is left with the sampler's own generator seeded by seed; numpy's global random state is not used.
    """
    k = check_sampling(temperature, top_k, top_p)

    if temperature <= 0:

        def greedy(logits: np.ndarray) -> int:
            return int(np.argmax(_as_logits(logits)))

        return greedy

    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        with np.errstate(over="ignore"):  # a tiny temperature overflows to inf, handled below
            x = _as_logits(logits) / temperature
        candidates = _top_k_indices(x, k) if 0 < k < x.size else np.arange(x.size)
        scores = x[candidates]
        best = scores.max()
        if best == -np.inf:
            raise ValueError("all candidate logits are -inf")
        if best == np.inf:
            # Overflow from a tiny temperature: the infinite logits are the only candidates.
            weights = (scores == best).astype(np.float64)
        else:
            weights = np.exp(scores - best)
        if top_p < 1.0:
            # Stable sort: among equal probabilities the lowest token id comes first, as in greedy.
            order = np.argsort(-weights, kind="stable")
            cumulative = np.cumsum(weights[order])
            n_keep = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
            keep = order[: min(n_keep, order.size)]
            candidates, weights = candidates[keep], weights[keep]
        cumulative = np.cumsum(weights)
        # side="right" never lands on a zero-weight entry.
        i = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(i, candidates.size - 1)])

    return sample
