"""Tests for batch.infer.sampling.make_sampler: greedy, temperature, top-k, top-p, seeding and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batch.infer.sampling import make_sampler

LOGITS = np.array([1.0, 3.0, 2.5, -0.5, 0.0, 2.9, -2.0])
NEG_INF = -np.inf


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def draws(sampler, logits: np.ndarray, n: int) -> np.ndarray:
    return np.array([sampler(logits) for _ in range(n)])


def frequencies(tokens: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(tokens, minlength=size) / tokens.size


# Chi-square critical values at p = 0.001, by degrees of freedom (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    support = probs > 0
    assert observed[~support].sum() == 0, "drew a token of probability zero"
    expected = probs[support] * tokens.size
    return float((((observed[support] - expected) ** 2) / expected).sum())


# --- greedy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax(temperature: float) -> None:
    sample = make_sampler(temperature)
    assert sample(LOGITS) == 1
    assert sample(np.array([5.0])) == 0
    assert sample(np.array([-3.0, -1.0, -2.0])) == 1
    assert sample(np.array([NEG_INF, 0.0, NEG_INF])) == 1
    assert isinstance(sample(LOGITS), int)


def test_greedy_ties_go_to_lowest_index() -> None:
    sample = make_sampler(0.0)
    assert sample(np.array([1.0, 4.0, 2.0, 4.0, 4.0])) == 1
    assert sample(np.zeros(10)) == 0
    assert sample(np.array([NEG_INF, 7.0, 7.0])) == 1


def test_greedy_ignores_seed_and_filters() -> None:
    for seed in (None, 0, 1):
        sample = make_sampler(0.0, top_k=3, top_p=0.5, seed=seed)
        assert [sample(LOGITS) for _ in range(20)] == [1] * 20


def test_greedy_accepts_lists_and_other_dtypes() -> None:
    sample = make_sampler(0.0)
    assert sample([0.0, 2.0, 1.0]) == 1
    assert sample(np.array([0, 2, 3], dtype=np.int64)) == 2
    assert sample(np.array([0.5, 0.25, 0.75], dtype=np.float16)) == 2


# --- seeding --------------------------------------------------------------------------------------------------


def test_same_seed_same_sequence() -> None:
    logits = np.zeros(50)
    a = draws(make_sampler(1.0, seed=1234), logits, 200)
    b = draws(make_sampler(1.0, seed=1234), logits, 200)
    assert a.tolist() == b.tolist()
    # The sequence is not constant: the generator advances between draws.
    assert len(set(a.tolist())) > 10


def test_different_seeds_differ() -> None:
    logits = np.zeros(50)
    sequences = {tuple(draws(make_sampler(1.0, seed=s), logits, 50).tolist()) for s in range(5)}
    assert len(sequences) == 5


def test_samplers_do_not_share_state() -> None:
    logits = np.zeros(50)
    reference = draws(make_sampler(1.0, seed=7), logits, 200).tolist()
    a, b = make_sampler(1.0, seed=7), make_sampler(1.0, seed=7)
    from_a, from_b = [], []
    for _ in range(100):
        from_a.append(a(logits))
        b(logits)
        from_b.append(b(logits))
    assert from_a == reference[:100]
    assert from_b == reference[1::2]


def test_global_numpy_rng_untouched() -> None:
    np.random.seed(99)
    before = np.random.get_state()
    for seed in (None, 3):
        sample = make_sampler(0.8, top_k=5, top_p=0.9, seed=seed)
        for _ in range(100):
            sample(LOGITS)
    make_sampler(0.0)(LOGITS)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_global_numpy_seed_does_not_affect_draws() -> None:
    logits = np.zeros(50)
    np.random.seed(1)
    a = draws(make_sampler(1.0, seed=5), logits, 50).tolist()
    np.random.seed(2)
    b = draws(make_sampler(1.0, seed=5), logits, 50).tolist()
    assert a == b


# --- top-k ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.01, 0.5, 1.0, 10.0, 1e6])
def test_top_k_one_is_argmax(temperature: float) -> None:
    sample = make_sampler(temperature, top_k=1, seed=0)
    assert set(draws(sample, LOGITS, 300).tolist()) == {1}
    # Ties at the top go to the lowest index, as in greedy.
    assert set(draws(sample, np.array([0.0, 2.0, 2.0, 1.9]), 300).tolist()) == {1}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_stays_within_k_best(k: int) -> None:
    allowed = set(np.argsort(-LOGITS, kind="stable")[:k].tolist())
    # A high temperature makes the distribution nearly flat, so anything outside the k best would show up.
    seen = set(draws(make_sampler(20.0, top_k=k, seed=k), LOGITS, 2000).tolist())
    assert seen == allowed


def test_top_k_ties_at_cutoff_go_to_lowest_index() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    # The two 3.0s, then the first of the three tied 2.0s.
    seen = set(draws(make_sampler(50.0, top_k=3, seed=0), logits, 2000).tolist())
    assert seen == {1, 2, 3}
    seen = set(draws(make_sampler(50.0, top_k=4, seed=0), logits, 2000).tolist())
    assert seen == {1, 2, 3, 4}
    # All equal: the k lowest indices.
    seen = set(draws(make_sampler(1.0, top_k=3, seed=0), np.zeros(8), 2000).tolist())
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("k", [0, 7, 100])
def test_top_k_off_or_larger_than_vocab_keeps_everything(k: int) -> None:
    seen = set(draws(make_sampler(50.0, top_k=k, seed=0), LOGITS, 2000).tolist())
    assert seen == set(range(LOGITS.size))


def test_top_k_renormalises_over_kept_tokens() -> None:
    n, temperature = 20000, 1.0
    tokens = draws(make_sampler(temperature, top_k=3, seed=11), LOGITS, n)
    kept = np.argsort(-LOGITS)[:3]
    expected = np.zeros(LOGITS.size)
    expected[kept] = softmax(LOGITS[kept] / temperature)
    assert np.abs(frequencies(tokens, LOGITS.size) - expected).max() < 0.01
    assert chi_square(tokens, expected) < CHI2_999[2]


# --- top-p ----------------------------------------------------------------------------------------------------

NUCLEUS_PROBS = np.array([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.3, {0}),
        (0.5 - 1e-6, {0}),
        (0.7, {0, 1}),
        (0.8 - 1e-6, {0, 1}),
        (0.8 + 1e-6, {0, 1, 2}),
        (0.85, {0, 1, 2}),
        (0.95 + 1e-6, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_nucleus(top_p: float, kept: set[int]) -> None:
    # Exactly top_p=0.8 (= 0.5 + 0.3) is left out: at that boundary the answer depends on float rounding.
    seen = set(draws(make_sampler(1.0, top_p=top_p, seed=0), np.log(NUCLEUS_PROBS), 3000).tolist())
    assert seen == kept


def test_top_p_order_does_not_depend_on_position() -> None:
    permutation = np.array([2, 0, 3, 1])  # logits[i] = log(NUCLEUS_PROBS[permutation[i]])
    logits = np.log(NUCLEUS_PROBS[permutation])
    seen = set(draws(make_sampler(1.0, top_p=0.7, seed=0), logits, 3000).tolist())
    assert seen == {1, 3}  # the tokens holding 0.5 and 0.3


def test_top_p_renormalises_over_nucleus() -> None:
    tokens = draws(make_sampler(1.0, top_p=0.7, seed=5), np.log(NUCLEUS_PROBS), 20000)
    expected = np.array([0.5, 0.3, 0.0, 0.0]) / 0.8
    assert np.abs(frequencies(tokens, 4) - expected).max() < 0.01
    assert chi_square(tokens, expected) < CHI2_999[1]


def test_top_p_applies_after_temperature() -> None:
    # At T=0.5 the probabilities become [25, 9, 2.25, 0.25] / 36.5: the first token alone holds ~0.685.
    logits = np.log(NUCLEUS_PROBS)
    assert set(draws(make_sampler(0.5, top_p=0.6, seed=0), logits, 2000).tolist()) == {0}
    assert set(draws(make_sampler(1.0, top_p=0.6, seed=0), logits, 2000).tolist()) == {0, 1}


def test_top_p_ties_go_to_lowest_index() -> None:
    seen = set(draws(make_sampler(1.0, top_p=0.5, seed=0), np.zeros(4), 2000).tolist())
    assert seen == {0, 1}


def test_top_p_always_keeps_at_least_one_token() -> None:
    seen = set(draws(make_sampler(1.0, top_p=1e-9, seed=0), LOGITS, 500).tolist())
    assert seen == {1}


def test_top_k_and_top_p_combined() -> None:
    # top_k=3 keeps tokens 1, 5, 2; at T=1 their renormalised probabilities are ~[0.38, 0.34, 0.28].
    seen = set(draws(make_sampler(1.0, top_k=3, top_p=0.6, seed=0), LOGITS, 2000).tolist())
    assert seen == {1, 5}


# --- temperature: empirical frequencies -----------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "seed"), [(0.7, 0), (1.5, 1)])
def test_frequencies_match_softmax(temperature: float, seed: int) -> None:
    logits = np.array([0.5, 1.5, -0.3, 1.0, 0.0])
    n = 20000
    tokens = draws(make_sampler(temperature, seed=seed), logits, n)
    expected = softmax(logits / temperature)
    assert np.abs(frequencies(tokens, logits.size) - expected).max() < 0.01
    assert chi_square(tokens, expected) < CHI2_999[logits.size - 1]


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([2.0, 1.0, 0.0])
    cold = frequencies(draws(make_sampler(0.3, seed=0), logits, 3000), 3)
    hot = frequencies(draws(make_sampler(5.0, seed=0), logits, 3000), 3)
    assert cold[0] > 0.9
    assert hot.max() < 0.5 and hot.min() > 0.2


def test_shift_invariance() -> None:
    logits = np.array([0.5, 1.5, -0.3, 1.0, 0.0])
    a = draws(make_sampler(1.0, seed=3), logits, 500).tolist()
    b = draws(make_sampler(1.0, seed=3), logits + 1000.0, 500).tolist()
    assert a == b


# --- -inf logits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (100.0, 0, 1.0), (1e6, 0, 1.0), (100.0, 4, 1.0), (100.0, 0, 0.99), (100.0, 5, 0.999)],
)
def test_neg_inf_never_drawn(temperature: float, top_k: int, top_p: float) -> None:
    logits = np.array([NEG_INF, 0.0, NEG_INF, 1.0, NEG_INF, -50.0, NEG_INF])
    seen = set(draws(make_sampler(temperature, top_k=top_k, top_p=top_p, seed=0), logits, 2000).tolist())
    assert seen <= {1, 3, 5}
    assert {1, 3} <= seen


def test_single_finite_logit_is_always_drawn() -> None:
    logits = np.full(6, NEG_INF)
    logits[4] = -3.0
    assert set(draws(make_sampler(2.0, seed=0), logits, 200).tolist()) == {4}


def test_all_neg_inf_rejected_when_sampling() -> None:
    with pytest.raises(ValueError):
        make_sampler(1.0, seed=0)(np.full(4, NEG_INF))


def test_tiny_temperature_behaves_like_argmax() -> None:
    with np.errstate(over="ignore"):
        sample = make_sampler(1e-300, seed=0)
        assert set(draws(sample, LOGITS, 100).tolist()) == {1}


# --- argument checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": 1.0, "top_k": -1},
        {"temperature": 1.0, "top_k": 1.5},
        {"temperature": 1.0, "top_k": "3"},
        {"temperature": 1.0, "top_p": 0.0},
        {"temperature": 1.0, "top_p": -0.1},
        {"temperature": 1.0, "top_p": 1.0 + 1e-9},
        {"temperature": 1.0, "top_p": 2.0},
        {"temperature": 1.0, "top_p": math.nan},
        {"temperature": 0.0, "top_k": -1},
        {"temperature": 0.0, "top_p": 0.0},
    ],
)
def test_invalid_arguments_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_sampler(**kwargs)


def test_numpy_integer_top_k_accepted() -> None:
    sample = make_sampler(1.0, top_k=np.int64(1), seed=0)
    assert sample(LOGITS) == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "logits",
    [
        np.zeros((2, 3)),
        np.zeros((1, 4)),
        np.float64(1.0),
        np.array([]),
        np.array([0.0, math.nan, 1.0]),
        np.array([math.nan]),
    ],
    ids=["2d", "row", "scalar", "empty", "nan", "all-nan"],
)
def test_invalid_logits_rejected(temperature: float, logits: np.ndarray) -> None:
    sample = make_sampler(temperature, seed=0)
    with pytest.raises(ValueError):
        sample(logits)
