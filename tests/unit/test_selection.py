"""Exp3, Exp4 and the ensemble on synthetic streams (no broker)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipstream.selection import Exp3, Exp4, SelectionState, combine


def exp3_rounds_to_settle(seed: int) -> tuple[Exp3, int | None]:
    rng = np.random.default_rng(seed)
    loss_rate = np.array([0.5, 0.1, 0.3])  # arm 1 is best
    algo = Exp3(3, eta=0.05, gamma=0.05)
    settled = None
    for t in range(3000):
        arm, prob = algo.select(rng)
        algo.update(arm, float(rng.random() < loss_rate[arm]), prob)
        if settled is None and algo.probabilities()[1] > 0.8:
            settled = t + 1
    return algo, settled


def test_exp3_concentrates_on_the_best_arm() -> None:
    algo, settled = exp3_rounds_to_settle(0)
    assert algo.probabilities()[1] > 0.9
    assert settled is not None and settled < 1500


def test_exp4_tracks_the_best_expert_and_recovers_when_it_degrades() -> None:
    rng = np.random.default_rng(1)
    algo = Exp4(3, eta=0.2)
    accuracy = np.array([0.95, 0.7, 0.5])
    for _ in range(500):
        algo.update((rng.random(3) > accuracy).astype(float))
    assert algo.weights().argmax() == 0 and algo.weights()[0] > 0.8
    accuracy = np.array([0.2, 0.9, 0.5])  # the best model breaks
    recovered = None
    for t in range(2000):
        algo.update((rng.random(3) > accuracy).astype(float))
        if recovered is None and algo.weights()[1] > 0.8:
            recovered = t + 1
    assert recovered is not None and recovered < 300


def test_exp4_absent_expert_is_neither_rewarded_nor_punished() -> None:
    algo = Exp4(3, eta=0.5, share=0.0)
    algo.update(np.array([1.0, 0.0, 0.0]), mask=np.array([True, True, False]))
    w = algo.weights()
    # expert 2 was charged the mean loss of those present (0.5): between the two
    assert w[1] > w[2] > w[0]


def test_millions_of_updates_stay_finite() -> None:
    rng = np.random.default_rng(2)
    e3, e4 = Exp3(4, eta=1.0, gamma=0.01), Exp4(4, eta=5.0)
    losses = rng.random((2_000_000, 4)) < 0.5
    for i in range(0, 2_000_000, 1000):  # coarse steps keep the test quick
        e4.update(losses[i].astype(float))
        e3.update(i % 4, 1.0, 1e-9)
    e3.logw = [x - 1e6 for x in e3.logw]  # even a corrupted offset normalises away
    from clipstream.selection.logweights import normalise

    e3.logw = normalise(e3.logw)
    for p in (e3.probabilities(), e4.weights()):
        assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0) and (p >= 0).all()


@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 1), st.floats(1e-6, 1)), max_size=50))
def test_exp3_probabilities_are_always_a_distribution(updates) -> None:
    algo = Exp3(3, eta=0.5, gamma=0.1)
    for arm, loss, prob in updates:
        algo.update(arm, loss, prob)
    p = algo.probabilities()
    assert np.isfinite(p).all() and (p >= 0.1 / 3 - 1e-12).all() and p.sum() == pytest.approx(1)


@pytest.mark.parametrize("policy", ["EXP3", "EXP4"])
def test_state_round_trips_through_its_bytes_exactly(policy: str) -> None:
    state = SelectionState.new(policy, ["a", "b", "c"], eta=0.2, gamma=0.1)
    for truth in "abcabcaa":
        state.learn({"a": truth, "b": "b"}, "a", {"a": 0.4, "b": 0.3})
    state.mark_applied(3, 17)
    raw = state.to_bytes()
    # plain JSON, which any reader of the changelog (and json.dumps's output) shares
    assert json.loads(raw) == state.to_state()
    for copy in (
        SelectionState.from_bytes(raw),
        SelectionState.from_bytes(json.dumps(state.to_state()).encode()),
    ):
        assert copy.to_state() == state.to_state()  # exact floats
        assert copy.weights() == state.weights()
        assert copy.choose(np.random.default_rng(5)) == state.choose(np.random.default_rng(5))
        assert not copy.should_apply(3, 17) and copy.should_apply(3, 18)
        assert copy.should_apply(2, 0)


def test_exp3_stays_finite_given_a_probability_that_is_not_a_number() -> None:
    # an observation's probability comes off a topic: a NaN there must not poison the state
    state = SelectionState.new("EXP3", ["a", "b"], eta=0.2, gamma=0.1)
    state.learn({"a": "x"}, "y", {"a": float("nan")})
    assert np.isfinite(state.algo.logw).all()
    assert SelectionState.from_bytes(state.to_bytes()).to_state() == state.to_state()


def test_state_learns_exp4_from_labels_and_punishes_missing_answers() -> None:
    state = SelectionState.new("EXP4", ["good", "bad", "slow"], eta=0.3)
    for _ in range(50):
        state.learn({"good": "1", "bad": "2", "slow": None}, "1")
    w = state.weights()
    assert w["good"] > 0.9 and w["slow"] < 0.05 and w["bad"] < 0.05


def test_sync_models_keeps_weights_of_models_still_present() -> None:
    state = SelectionState.new("EXP4", ["a", "b"], eta=0.5)
    for _ in range(20):
        state.learn({"a": "x", "b": "y"}, "x")
    before = state.weights()["a"] / state.weights()["b"]
    state.sync_models(["b", "a", "c"])
    after = state.weights()
    assert after["a"] / after["b"] == pytest.approx(before)
    assert set(after) == {"a", "b", "c"}


def test_combine_aligns_classes_by_name_and_skips_missing() -> None:
    out = combine(
        ["1", None, "0"],
        [np.array([0.2, 0.8]), None, np.array([0.3, 0.7])],
        [["0", "1"], [], ["1", "0"]],  # the third model lists classes the other way round
        np.array([0.5, 0.3, 0.5]),
    )
    assert out.label == "1" and out.used == [0, 2]
    assert out.confidence == pytest.approx(0.5 * 0.8 + 0.5 * 0.3)
    assert combine([None, None], [None, None], [[], []], np.ones(2)).label is None
    tie = combine(["b", "a"], [None, None], [[], []], np.array([1.0, 1.0]))
    assert tie.label == "a"  # ties break by name, not by arrival order


@pytest.mark.parametrize("policy", ["EXP3", "EXP4"])
def test_a_reregistered_apps_eta_and_gamma_apply_over_the_weights_learnt(policy: str) -> None:
    app = {"policy": policy, "models": ["a", "b"], "eta": 0.1, "gamma": 0.05}
    state = SelectionState.following(None, app)
    state.learn({"a": "1", "b": "0"}, "1", {"a": 0.9, "b": 0.8})
    learnt = list(state.algo.logw)
    again = SelectionState.following(state, {**app, "eta": 0.5, "gamma": 0.2})
    assert again is state and list(again.algo.logw) == learnt  # weights kept
    assert again.algo.eta == 0.5
    if policy == "EXP3":
        assert again.algo.gamma == 0.2
