"""The verifier's guarantees: soundness of the ball with an exact bound, chaining without
false accepts, chains travelling beyond one ball. Classifier gates are only checked for their
interface here; their failure is measured by the `gate` experiment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample import safety
from jaxsample.errors import ArgumentError
from jaxsample.models import init_params
from jaxsample.safety import modular

DIMS = (84, 240, 768)


def linear_safety(dim, margin=0.5):
    a = jax.random.normal(jax.random.key(dim), (dim,))
    return a, margin, (lambda theta: a @ theta + margin)


def test_ball_accepts_only_safe_points_for_a_linear_safety_function():
    dim, num_points = 84, 100_000
    a, margin, s = linear_safety(dim)
    bound = safety.LipschitzBound(jnp.linalg.norm(a), "analytic")
    gate = safety.ball_gate(s, bound)
    state = gate.init(jnp.zeros(dim))
    radius = float(state.radius)
    direction_key, length_key = jax.random.split(jax.random.key(0))
    directions = jax.random.normal(direction_key, (num_points, dim))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    points = directions * radius * jax.random.uniform(length_key, (num_points, 1)) ** (1 / dim)
    accepted, _ = jax.jit(jax.vmap(gate.accept, in_axes=(None, 0)))(state, points)
    accepted = np.asarray(accepted)
    exact_s = np.asarray(points, np.float64) @ np.asarray(a, np.float64) + margin
    inside = np.linalg.norm(np.asarray(points, np.float64), axis=1) <= radius * (1 - 1e-6)
    assert accepted[inside].all(), "the ball rejected a point inside its radius"
    assert (exact_s[accepted] >= 0).all(), f"accepted an unsafe point: min s = {exact_s[accepted].min()}"
    # The ball is tight: just outside it along -a the linear s is below τ, and the gate rejects.
    outside = -(1 + 1e-3) * radius * a / jnp.linalg.norm(a)
    assert float(s(outside)) < 0
    assert not bool(gate.accept(state, outside)[0])


@pytest.mark.parametrize("dim", DIMS)
def test_chaining_with_exact_bound_never_accepts_an_unsafe_point(dim):
    runs, steps = 1000, 40
    controller = safety.controller_problem(jax.random.key(dim), dim)
    problem = controller.problem
    gates = {
        "chain": safety.ball_gate(problem.safety, controller.bound, chain=True),
        "group chain": safety.ball_gate(problem.safety, controller.group_bound, chain=True, group_ids=controller.group_ids),
    }
    keys = jax.random.split(jax.random.key(1), runs)
    run_all = jax.jit(lambda keys: {name: jax.vmap(lambda k: safety.simulate(k, problem, g, steps))(keys) for name, g in gates.items()})
    traces = run_all(keys)
    for name, trace in traces.items():
        assert int(trace.false_accepts[:, -1].max()) == 0, f"{name} accepted an unsafe point"
        assert int(trace.true_accepts[:, -1].sum()) > 0
    for name in ("chain", "group chain"):  # chains reach the boundary, where proposals can be unsafe
        assert int((~traces[name].proposal_safe).sum()) > 0, f"{name}: no unsafe proposal, so the test could not fail"
    chain_distance = np.asarray(traces["chain"].distance[:, -1])
    assert np.median(chain_distance) > 1.5, f"chains stayed within one ball: median {np.median(chain_distance):.2f} r0"
    assert int(traces["chain"].transitions[:, -1].min()) > 0


def test_gate_state_counts_and_one_ball_stays_within_its_radius():
    controller = safety.controller_problem(jax.random.key(3), 84)
    problem = controller.problem
    gates = {"chain": safety.ball_gate(problem.safety, controller.bound, chain=True), "ball": safety.ball_gate(problem.safety, controller.bound)}
    traces = jax.jit(lambda k: {n: safety.simulate(k, problem, g, 60) for n, g in gates.items()})(jax.random.key(4))
    for trace in traces.values():
        assert int(trace.accepted.sum()) == int(trace.true_accepts[-1] + trace.false_accepts[-1])
    # exact bound: every accepted point is safe and becomes a centre
    assert int(traces["chain"].accepted.sum()) == int(traces["chain"].transitions[-1])
    assert float(traces["ball"].distance.max()) <= 1 + 1e-5 and int(traces["ball"].transitions[-1]) == 0


def test_ball_gate_rejects_mismatched_bound_and_groups():
    a, _, s = linear_safety(8)
    with pytest.raises(ArgumentError, match="group"):
        safety.ball_gate(s, safety.LipschitzBound(jnp.ones(2), "analytic")).init(jnp.zeros(8))
    with pytest.raises(ArgumentError, match="group_ids"):
        safety.ball_gate(s, safety.LipschitzBound(jnp.ones(2), "analytic"), group_ids=np.zeros(5, int)).init(jnp.zeros(8))
    # A group with no bound entry would move for free (segment_sum drops its ids).
    with pytest.raises(ArgumentError, match=r"groups 0..1, so the bound needs shape \(2,\)"):
        safety.ball_gate(s, safety.LipschitzBound(jnp.ones(1), "analytic"), group_ids=np.repeat([0, 1], 4)).init(jnp.zeros(8))
    with pytest.raises(ArgumentError, match="kind"):
        safety.LipschitzBound(jnp.float32(1), "guessed")


@pytest.mark.parametrize("value", [-2.0, np.nan, [1.0, -0.5], -1])
def test_lipschitz_bound_rejects_a_negative_or_nan_value(value):
    with pytest.raises(ArgumentError, match=r"value must be a number in \[0, inf\], got"):
        safety.LipschitzBound(value if isinstance(value, int) else jnp.asarray(value, jnp.float32), "analytic")


@pytest.mark.parametrize("value", [-2.0, np.nan])
@pytest.mark.parametrize("group_ids", [None, np.zeros(3, int)])
def test_ball_gate_with_an_invalid_traced_bound_certifies_nothing(value, group_ids):
    # Computed under jit, the bound escapes LipschitzBound's check: the gate itself must refuse it.
    shape = () if group_ids is None else (1,)
    bound = lambda p: safety.LipschitzBound(jnp.full(shape, value) + 0 * jnp.sum(p), "analytic")
    gate = safety.ball_gate(lambda p: 1.0 - jnp.sum(p**2), bound, chain=True, group_ids=group_ids)
    accepted, state = jax.jit(lambda x0, x: gate.accept(gate.init(x0), x))(jnp.zeros(3), jnp.full(3, 100.0))
    assert not bool(accepted) and int(state.false_accepts) == 0
    assert np.all(np.asarray(state.radius) == 0)


def test_a_start_on_the_boundary_measures_distance_without_nan():
    # m_0 = s(θ_0) − τ = 0: safe, but r_0 = 0, and the old ‖θ − θ_0‖ / r_0 was 0/0 at θ_0.
    s = lambda theta: theta[0]  # noqa: E731
    start = jnp.zeros(2)
    ball = safety.ball_gate(s, safety.LipschitzBound(jnp.float32(1), "analytic"), chain=True)
    groups = safety.ball_gate(s, safety.LipschitzBound(jnp.array([1.0, 0.0]), "analytic"), group_ids=np.array([0, 1]))
    stay = safety.SelfImprovementProblem(start, lambda key, params: params, lambda params: 0.0, s)

    @jax.jit
    def run():
        return (
            ball.accept(ball.init(start), start),
            safety.simulate(jax.random.key(0), stay, ball, 2).distance,
            groups.accept(groups.init(start), jnp.array([0.0, 1.0])),  # a group s ignores moves for free
        )

    (accepted, state), trace_distance, (group_accepted, group_state) = run()
    assert bool(accepted) and float(state.initial_radius) == 0 and float(state.distance) == 0
    assert np.all(np.asarray(trace_distance) == 0)
    assert bool(group_accepted) and float(group_state.distance) == np.inf  # r_0 = 0 away from θ_0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_annealed_thresholds_rejects_non_finite_scores(bad):
    with pytest.raises(ArgumentError, match=r"unsafe_scores must be a number in \(-inf, inf\), got (nan|inf) \(element \(1,\)\)"):
        safety.annealed_thresholds(np.array([0.1, bad, 0.3]), 3)


def test_classifier_gate_interface_and_annealed_schedule():
    controller = safety.controller_problem(jax.random.key(5), 84)
    problem = controller.problem
    candidates, safe = safety.proposal_dataset(jax.random.key(6), problem, 20, 10)
    score = safety.fit_classifier("logistic", jax.random.key(7), candidates, safe)
    unsafe_scores = jax.vmap(score)(candidates[~safe])
    thresholds = safety.annealed_thresholds(unsafe_scores, 200, scale=0.5, power=1.5)
    assert (np.diff(np.asarray(thresholds)) >= 0).all()
    admitted = (np.asarray(unsafe_scores)[None, :] >= np.asarray(thresholds)[:, None]).mean(axis=1)
    assert (admitted <= 0.5 * np.arange(1, 201) ** -1.5 + 1e-12).all()
    gate = safety.classifier_gate(score, thresholds, problem.safety)
    trace = jax.jit(lambda k: safety.simulate(k, problem, gate, 30))(jax.random.key(8))
    assert int(trace.accepted.sum()) == int(trace.true_accepts[-1] + trace.false_accepts[-1])
    with pytest.raises(ArgumentError, match="kind"):
        safety.fit_classifier("svm", jax.random.key(0), candidates, safe)
    with pytest.raises(ArgumentError, match="both classes"):
        safety.fit_classifier("knn", jax.random.key(0), candidates, jnp.ones(len(safe), bool))


def test_unembedding_chain_on_a_transformer_never_accepts_an_unsafe_point():
    """Spec §2.5 with the exact canary-logit bound, on an untrained decoder (the guarantee does
    not depend on training)."""
    config = modular.modular_config(7)
    params = init_params(jax.random.key(0), config)
    task = modular.canary_task(config, params, num_canaries=8)
    unembedding = modular.unembedding_problem(config, params, task)
    problem = unembedding.problem
    assert unembedding.bound.kind == "analytic"
    gates = {
        "chain": safety.ball_gate(problem.safety, unembedding.bound, chain=True),
        "group chain": safety.ball_gate(problem.safety, unembedding.group_bound, chain=True, group_ids=unembedding.group_ids),
    }
    keys = jax.random.split(jax.random.key(1), 100)
    traces = jax.jit(lambda keys: {n: jax.vmap(lambda k: safety.simulate(k, problem, g, 25))(keys) for n, g in gates.items()})(keys)
    for name, trace in traces.items():
        assert int((~trace.proposal_safe).sum()) > 0, f"{name}: no unsafe proposal, so the test could not fail"
        assert int(trace.false_accepts[:, -1].max()) == 0, f"{name} accepted an unsafe point"
        assert float(np.median(trace.distance[:, -1])) > 1.0


def test_simulate_draws_the_same_under_x64():
    # The proposal drew with the default dtype: under x64 its float64 candidates broke the
    # scan carry of float32 params (`proposal_dataset` too), and its draws differed.
    a = jnp.array([1.0, -2.0, 0.5, 0.0], jnp.float32)
    s = lambda theta: a @ theta + 1.0  # noqa: E731
    propose = safety.gradient_proposal(lambda theta: -s(theta), a, step_range=(0.05, 0.5), temptation_probability=0.5,
                                       temptation_size=0.3, noise=0.05)
    problem = safety.SelfImprovementProblem(jnp.zeros(4, jnp.float32), propose, lambda theta: -s(theta), s)
    gate = safety.ball_gate(s, safety.LipschitzBound(jnp.linalg.norm(a), "analytic"), chain=True)
    run = jax.jit(lambda key: safety.simulate(key, problem, gate, 6, record_proposals=True))
    expected = run(jax.random.key(0))
    with jax.enable_x64(True):
        got = run(jax.random.key(0))
    assert got.proposal.dtype == jnp.float32
    for old, new in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(new, old)


def test_controller_problem_is_the_same_under_x64():
    # Its network was drawn with the default dtype: under x64 the same key gave another
    # (float64) network, so another bound and other runs. (The default sizes share compiled
    # ops with the tests above.)
    def build():
        controller = safety.controller_problem(jax.random.key(3), 84)
        theta = jnp.full(84, 0.01, jnp.float32)
        return (controller.weights, controller.bound.value,
                controller.problem.safety(theta), controller.problem.reward(theta))

    expected = build()
    with jax.enable_x64(True):
        got = build()
    for old, new in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert new.dtype == jnp.float32
        np.testing.assert_array_equal(new, old)


def test_chain_does_not_recentre_on_an_accepted_unsafe_point():
    # s(θ) = 1 − θ_0 has Lipschitz constant 1; the invalid bound 0.1 certifies a ball of radius
    # 10, so the unsafe [5, 0] (s = −4) gets in. It is a false accept, and the chain must stay
    # at the old centre: re-centring there (margin −4) would reject everything afterwards.
    gate = safety.ball_gate(lambda p: 1.0 - p[0], safety.LipschitzBound(jnp.float32(0.1), "estimated"), chain=True)
    state = gate.init(jnp.zeros(2))
    accepted, state = gate.accept(state, jnp.array([5.0, 0.0]))
    assert bool(accepted) and int(state.false_accepts) == 1 and int(state.true_accepts) == 0
    np.testing.assert_array_equal(state.centre, [0.0, 0.0])
    assert float(state.margin) == 1.0 and int(state.transitions) == 0
    accepted, state = gate.accept(state, jnp.array([0.5, 0.0]))
    assert bool(accepted) and int(state.true_accepts) == 1 and int(state.transitions) == 1
    np.testing.assert_array_equal(state.centre, [0.5, 0.0])
    assert float(state.margin) == 0.5
