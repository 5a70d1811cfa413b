"""A tiny masked discrete-diffusion LM (MDLM-style) and twisted SMC over its unmasking path.

    model = jaxsample.diffusion.load("toy-diffusion")
    samples = jaxsample.diffusion.unmask(key, model, num_samples=64)          # .tokens [S, T]
    result = jaxsample.diffusion.twisted_diffusion_smc(key, model, log_potential_fn, num_particles=64)

- Model: `DiffusionConfig`, `MaskedDiffusionLM` (`log_probs`, `logits_and_features`), `init_model`,
  `mdlm_loss`; checkpoints: `save`, `load`.
- Sampling: `unmask` (ancestral unmasking, K fixed steps, `lax.scan`), `unmask_step`.
- Twisted SMC: `twisted_diffusion_smc`, `init`, `build_kernel` (reuses `jaxsample.smc`'s resamplers
  and log-weight helpers).
- TRI-TSMC over the unmasking path: `learn_diffusion_twist` (linear head on denoiser features,
  the landed `solve_trust_region_beta`).
- Exact enumeration for tiny configs: `model_law`, `optimal_log_twist`, `tabular_log_twist_fn`.
"""

from jaxsample.diffusion.model import DiffusionConfig, MaskedDiffusionLM, init_model, mdlm_loss
from jaxsample.diffusion.sampler import UnmaskResult, unmask, unmask_step
from jaxsample.diffusion.twisted import (
    DiffusionSMCInfo,
    DiffusionSMCResult,
    DiffusionSMCState,
    build_kernel,
    init,
    twisted_diffusion_smc,
)
from jaxsample.diffusion import checkpoint
from jaxsample.diffusion.checkpoint import load, load_problem, save
from jaxsample.diffusion.twist_learning import (
    UnmaskingPaths,
    init_linear_twist,
    learn_diffusion_twist,
    linear_log_twist,
    reconstruct_paths,
    tri_iteration,
)
from jaxsample.diffusion.enumeration import model_law, optimal_log_twist, tabular_log_twist_fn

__all__ = [
    "DiffusionConfig",
    "DiffusionSMCInfo",
    "DiffusionSMCResult",
    "DiffusionSMCState",
    "MaskedDiffusionLM",
    "UnmaskResult",
    "UnmaskingPaths",
    "build_kernel",
    "init",
    "init_linear_twist",
    "init_model",
    "learn_diffusion_twist",
    "linear_log_twist",
    "load",
    "load_problem",
    "mdlm_loss",
    "model_law",
    "optimal_log_twist",
    "reconstruct_paths",
    "save",
    "tabular_log_twist_fn",
    "tri_iteration",
    "twisted_diffusion_smc",
    "unmask",
    "unmask_step",
]
