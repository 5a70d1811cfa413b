"""Safety gates for self-improving updates (reconstruction of Scrivens, arXiv 2604.00072).

Verifiers: `ball_gate` (single ball, `chain=True` ball chaining, `group_ids=` per-group balls)
with `LipschitzBound`s that are analytic (`mlp_lipschitz_bound`, `unembedding_lipschitz_bound`)
or estimated (`sampled_lipschitz_bound`, conditional). Baselines: `classifier_gate` over
`fit_classifier` scorers with fixed or `annealed_thresholds`. Simulators: `controller_problem`,
the modular-addition transformer (`jaxsample.safety.modular`), and `simulate`.
"""

from jaxsample.safety.classifiers import CLASSIFIERS, annealed_thresholds, classifier_gate, fit_classifier
from jaxsample.safety.controller import Controller, controller_problem
from jaxsample.safety.gate import Gate, GateState, ball_gate
from jaxsample.safety.lipschitz import (
    LipschitzBound,
    mlp_lipschitz_bound,
    sampled_lipschitz_bound,
    unembedding_lipschitz_bound,
)
from jaxsample.safety.simulate import SelfImprovementProblem, Trace, gradient_proposal, proposal_dataset, simulate

__all__ = [
    "CLASSIFIERS",
    "Controller",
    "Gate",
    "GateState",
    "LipschitzBound",
    "SelfImprovementProblem",
    "Trace",
    "annealed_thresholds",
    "ball_gate",
    "classifier_gate",
    "controller_problem",
    "fit_classifier",
    "gradient_proposal",
    "mlp_lipschitz_bound",
    "proposal_dataset",
    "sampled_lipschitz_bound",
    "simulate",
    "unembedding_lipschitz_bound",
]
