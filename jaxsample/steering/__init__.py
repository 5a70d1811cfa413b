"""Activation steering: A-LQR feedback control of the residual stream, and open-loop
baselines, all run inside the samplers as `jaxsample.Intervention`s; a bag-of-words attribute scorer
measures what they change."""

from jaxsample.steering.alqr import (
    Controller,
    alqr_feedback,
    alqr_intervention,
    contrastive_directions,
    controller,
    full_gain_intervention,
    last_token_jacobian,
    last_token_states,
    layer_jacobians,
    linearisation_error,
    riccati_gains,
    unit_directions,
)
from jaxsample.steering.baselines import (
    PIDGains,
    actadd_intervention,
    add_vector,
    mean_difference_intervention,
    pid_carry,
    pid_feedback,
    pid_intervention,
)
from jaxsample.steering.io import load_controller, save_controller
from jaxsample.steering.scorer import BagOfWordsScorer, fit_bag_of_words, words

__all__ = [
    "BagOfWordsScorer",
    "Controller",
    "PIDGains",
    "actadd_intervention",
    "add_vector",
    "alqr_feedback",
    "alqr_intervention",
    "contrastive_directions",
    "controller",
    "fit_bag_of_words",
    "full_gain_intervention",
    "last_token_jacobian",
    "last_token_states",
    "layer_jacobians",
    "linearisation_error",
    "load_controller",
    "mean_difference_intervention",
    "pid_carry",
    "pid_feedback",
    "pid_intervention",
    "riccati_gains",
    "save_controller",
    "unit_directions",
    "words",
]
