"""Power-distribution Metropolis–Hastings over completions (uniform and entropy-jump cuts).

Target π(x) ∝ p(x | prompt)^α. `power_sample` runs the block-wise sampler end to end;
`init` / `build_kernel` expose the MH step for use in other loops; `log_acceptance_ratio`
is the exact ratio the kernel uses; the baselines share `PowerSampleResult`.
"""

from jaxsample.mcmc.acceptance import LogRatio, Trace, log_acceptance_ratio
from jaxsample.mcmc.baselines import base_sample, best_of_n, temperature_sample
from jaxsample.mcmc.blocks import power_sample
from jaxsample.mcmc.cuts import CutLaw, EntropyJump, entropy_jump, resolve_cut_law, uniform
from jaxsample.mcmc.kernel import PowerMHInfo, PowerMHState, build_kernel, init
from jaxsample.mcmc.result import PowerSampleResult

__all__ = [
    "CutLaw",
    "EntropyJump",
    "LogRatio",
    "PowerMHInfo",
    "PowerMHState",
    "PowerSampleResult",
    "Trace",
    "base_sample",
    "best_of_n",
    "build_kernel",
    "entropy_jump",
    "init",
    "log_acceptance_ratio",
    "power_sample",
    "resolve_cut_law",
    "temperature_sample",
    "uniform",
]
