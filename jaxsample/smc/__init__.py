"""Sequential Monte Carlo: resampling, ESS and reward-guided SMC decoding.

`smc_decode` samples π(y) ∝ p(y | prompt)^α exp(λ r(y)) with block-wise SMC (prefix-only or
lookahead, optional resample-move rejuvenation); `twisted_smc` samples σ ∝ p φ with a
twist-induced proposal on the same kernel and `learn_twist` learns its twist (CTL or TRI-TSMC,
whose trust-region step is `solve_trust_region_beta`); `init` / `build_kernel` expose one SMC step
for custom loops; the resamplers and log-weight helpers work on any particle pytree. Given P
prompts and P keys, the samplers and the kernel run P independent runs in one batch, each
prompt's particles resampled among themselves.

    result = smc_decode(key, lm, prompt, reward_fn, num_particles=64, max_new_tokens=256,
                        alpha=4.0, lam=1.0, block_size=16, num_rejuvenation_steps=2)
    answer = result.sample                    # one particle drawn ∝ W
    estimate = jnp.exp(result.log_weights) @ f(result.tokens)  # E_π f, self-normalised
"""

from jaxsample.smc.resampling import (
    RESAMPLERS,
    Resampler,
    conditional_multinomial,
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
from jaxsample.smc.lookahead import Lookahead, ProposalTwist, estimate_log_value
from jaxsample.smc.rejuvenation import build_move, move_log_ratio
from jaxsample.smc.kernel import SMCInfo, SMCState, build_kernel, init
from jaxsample.smc.sampler import SMCResult, smc_decode
from jaxsample.smc.twisted import terminal_potential, twisted_proposal, twisted_smc
from jaxsample.smc.twist_learning import (
    Paths,
    TwistHead,
    TwistInfo,
    ctl_loss,
    init_twist_head,
    learn_twist,
    path_log_q,
    path_log_weights,
    sample_paths,
    teacher_forced_paths,
    tri_loss,
    twist_head_fn,
)
from jaxsample.smc.trust_region import (
    solve_trust_region_beta,
    tempered_log_weights,
    trust_region_kl,
)

__all__ = [
    "Lookahead",
    "Particles",
    "Paths",
    "ProposalTwist",
    "RESAMPLERS",
    "ResampleInfo",
    "Resampler",
    "RewardTarget",
    "SMCInfo",
    "SMCResult",
    "SMCState",
    "TwistHead",
    "TwistInfo",
    "build_kernel",
    "build_move",
    "ctl_loss",
    "conditional_multinomial",
    "ess",
    "estimate_log_value",
    "gather_particles",
    "get_resampler",
    "init",
    "init_twist_head",
    "learn_twist",
    "log_evidence",
    "make_target",
    "move_log_ratio",
    "multinomial",
    "normalize_log_weights",
    "path_log_q",
    "path_log_weights",
    "resample_if_needed",
    "residual",
    "sample_paths",
    "smc_decode",
    "solve_trust_region_beta",
    "stratified",
    "systematic",
    "teacher_forced_paths",
    "tempered_log_weights",
    "tri_loss",
    "twist_head_fn",
    "terminal_potential",
    "trust_region_kl",
    "twisted_proposal",
    "twisted_smc",
]
