"""Schedules equal their closed forms (Zhu & Gupta cubic, RigL cosine) and the update gate fires where it should."""

import math

import jax
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse as js


@given(
    st.floats(0.0, 0.5),
    st.floats(0.5, 0.99),
    st.integers(0, 100),
    st.integers(1, 50),
    st.integers(1, 20),
)
def test_polynomial_sparsity_closed_form(s_i, s_f, t0, n, dt):
    t1 = t0 + n * dt
    sched = jax.jit(js.polynomial_sparsity(s_f, t0, t1, dt, s_i))
    for t in [0, t0, t0 + 1, t0 + dt, (t0 + t1) // 2, t1 - 1, t1, t1 + 7]:
        tq = min(max(t, t0), t1)
        tq = t0 + (tq - t0) // dt * dt
        expected = s_f + (s_i - s_f) * (1 - (tq - t0) / (n * dt)) ** 3
        assert float(sched(t)) == pytest.approx(expected, abs=1e-6)
        # Identical to optax.polynomial_schedule evaluated on the grid (the spec's equivalence).
        ref = optax.polynomial_schedule(s_i, s_f, 3, transition_steps=n * dt, transition_begin=t0)(
            tq
        )
        assert float(sched(t)) == pytest.approx(float(ref), abs=1e-6)


@given(st.floats(0.0, 1.0), st.integers(1, 1000), st.integers(0, 2000))
def test_cosine_drop_fraction_closed_form(alpha, t_end, t):
    expected = alpha / 2 * (1 + math.cos(math.pi * t / t_end)) if t <= t_end else 0.0
    assert float(js.drop_fraction_schedule(alpha, t_end, "cosine")(t)) == pytest.approx(
        expected, abs=1e-6
    )


def test_update_gate():
    gate = jax.jit(js.update_gate(50, begin_step=100, end_step=300))
    fired = [t for t in range(400) if bool(gate(t))]
    assert fired == [100, 150, 200, 250, 300]
    assert [t for t in range(120) if bool(js.update_gate(40)(t))] == [0, 40, 80]


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: js.polynomial_sparsity(0.9, 100, 50),
            "`end_step` \\(50\\) must be >= `begin_step` \\(100\\)",
        ),
        (lambda: js.polynomial_sparsity(0.9, 0, 50, frequency=0), "`frequency` must be >= 1"),
        (lambda: js.polynomial_sparsity(1.2, 0, 50), "`final_sparsity` must be in"),
        (lambda: js.update_gate(0), "`frequency` must be >= 1"),
        (lambda: js.drop_fraction_schedule(1.5, 10), "`drop_fraction` must be in \\[0, 1\\]"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_polynomial_sparsity_single_step_window_reaches_final():
    sched = js.polynomial_sparsity(0.8, begin_step=5, end_step=5)
    assert [float(sched(t)) for t in (4, 5, 6)] == [0.0, pytest.approx(0.8), pytest.approx(0.8)]
