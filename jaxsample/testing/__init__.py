"""Prove sampler kernels correct against exact enumeration on tiny models.

The toolkit the library's own tests use, public so that a new cut law, proposal, acceptance
ratio or SMC variant can be checked in a few lines:

    import jaxsample as js
    from jaxsample import testing

    lm = testing.random_tabular_lm(vocab_size=4, max_new_tokens=4, seed=0)
    space = testing.enumerate_completions(lm, prompt=[0], max_new_tokens=4)   # 121 completions
    kernel = testing.mh_transition_matrix(space, my_cut_law, js.Proposal(temperature=0.5),
                                          testing.power_log_ratio(2.0, my_cut_law))
    testing.assert_stationary(kernel, testing.power_target(space, alpha=2.0))

- Toy models: `tabular_lm`, `random_tabular_lm`, `karan_du_example` (`LanguageModel`s), and
  prefix tables usable as rewards or values in JAX (`prefix_table_fn`, `random_reward`;
  `prefix_index` gives a prefix's row in such a table).
- Enumeration: `enumerate_completions` -> `Enumeration` (float64, any small model);
  `decode_state` starts a kernel from chosen completions.
- Exact targets: `power_target`, `tilted_target` (-> `Distribution` with log Z) and
  `value_function` (the optimal twist ψ* and lookahead value V).
- Exact kernels: `mh_transition_matrix` (-> `ExactKernel`), `power_log_ratio`,
  `assert_stationary`, `stationary_distribution`, `sampler_law` (block-wise samplers).
- Reference loops: `lockstep_power_sample`, block-wise power MH with the chains moved in
  lockstep by `build_kernel` steps; `power_sample` must give the same chains.
- Model ports: `rerandomize_torch_model` redraws a transformers model's weights so that
  a logit comparison against a port tests every term; `transformers_model`,
  `transformers_logits` and `transformers_greedy` give the PyTorch reference's outputs.
- Statistics with sample-size-derived bounds: `chain_histogram_tv`, `assert_tv_below`,
  `assert_unbiased`, `empirical_distribution`, `total_variation`.

Failed checks raise `jaxsample.errors.VerificationError` (an `AssertionError`) with a message
naming the worst state. This package does not import pytest.
"""

from jaxsample.testing.enumeration import Enumeration, decode_state, enumerate_completions
from jaxsample.testing.kernels import (
    ExactKernel,
    PowerLogRatio,
    assert_stationary,
    mh_transition_matrix,
    power_log_ratio,
    sampler_law,
    stationary_distribution,
)
from jaxsample.testing.lockstep import lockstep_power_sample
from jaxsample.testing.ports import (
    rerandomize_torch_model,
    transformers_greedy,
    transformers_logits,
    transformers_model,
)
from jaxsample.testing.statistics import (
    TVCheck,
    Unbiasedness,
    assert_tv_below,
    assert_unbiased,
    chain_histogram_tv,
    empirical_distribution,
    total_variation,
)
from jaxsample.testing.targets import Distribution, ValueFunction, power_target, tilted_target, value_function
from jaxsample.testing.toy import (
    karan_du_example,
    prefix_index,
    prefix_table_fn,
    random_reward,
    random_tabular_lm,
    tabular_lm,
)

__all__ = [
    "Distribution",
    "Enumeration",
    "ExactKernel",
    "PowerLogRatio",
    "TVCheck",
    "Unbiasedness",
    "ValueFunction",
    "assert_stationary",
    "assert_tv_below",
    "assert_unbiased",
    "chain_histogram_tv",
    "decode_state",
    "empirical_distribution",
    "enumerate_completions",
    "karan_du_example",
    "lockstep_power_sample",
    "mh_transition_matrix",
    "power_log_ratio",
    "power_target",
    "prefix_index",
    "prefix_table_fn",
    "random_reward",
    "random_tabular_lm",
    "rerandomize_torch_model",
    "sampler_law",
    "stationary_distribution",
    "tabular_lm",
    "tilted_target",
    "total_variation",
    "transformers_greedy",
    "transformers_logits",
    "transformers_model",
    "value_function",
]
