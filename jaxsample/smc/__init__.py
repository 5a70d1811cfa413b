"""Sequential Monte Carlo: resampling, ESS and reward-guided SMC decoding.

`smc_decode` samples π(y) ∝ p(y | prompt)^α exp(λ r(y)) with block-wise SMC (prefix-only or
lookahead, optional resample-move rejuvenation); `init` / `build_kernel` expose one SMC step
for custom loops; the resamplers and log-weight helpers work on any particle pytree.

    result = smc_decode(key, lm, prompt, reward_fn, num_particles=64, max_new_tokens=256,
                        alpha=4.0, lam=1.0, block_size=16, num_rejuvenation_steps=2)
    answer = result.sample                    # one particle drawn ∝ W
    estimate = jnp.exp(result.log_weights) @ f(result.tokens)  # E_π f, self-normalised
"""

from jaxsample.smc.resampling import (
    RESAMPLERS,
    Resampler,
    get_resampler,
    multinomial,
    residual,
    stratified,
    systematic,
)
from jaxsample.smc.weights import (
    ResampleInfo,
    ess,
    gather_particles,
    log_evidence,
    normalize_log_weights,
    resample_if_needed,
)
from jaxsample.smc.target import Particles, RewardTarget, make_target
from jaxsample.smc.lookahead import Lookahead, estimate_log_value
from jaxsample.smc.rejuvenation import build_move, move_log_ratio
from jaxsample.smc.kernel import SMCInfo, SMCState, build_kernel, init
from jaxsample.smc.sampler import SMCResult, smc_decode
from jaxsample.smc.trust_region import (
    solve_trust_region_beta,
    tempered_log_weights,
    trust_region_kl,
)

__all__ = [
    "Lookahead",
    "Particles",
    "RESAMPLERS",
    "ResampleInfo",
    "Resampler",
    "RewardTarget",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "build_kernel",
    "build_move",
    "ess",
    "estimate_log_value",
    "gather_particles",
    "get_resampler",
    "init",
    "log_evidence",
    "make_target",
    "move_log_ratio",
    "multinomial",
    "normalize_log_weights",
    "resample_if_needed",
    "residual",
    "smc_decode",
    "solve_trust_region_beta",
    "stratified",
    "systematic",
    "tempered_log_weights",
    "trust_region_kl",
]
