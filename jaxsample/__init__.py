"""jaxsample: inference-time reasoning methods for LLMs in JAX.

Public API: model loading (`load`), the `LanguageModel` interface, token-level proposals and
the batched decode loop, ancestral sampling (`generate`), teacher-forced scoring (`score`), model internals
(features, hidden states, `Intervention`s, LoRA adapters in `models.lora`), power-distribution MH
(`power_sample` and its baselines) and reward-guided SMC (`smc_decode`). Subpackages hold
the building blocks: `models`, `sampling`, `mcmc`, `smc`, `calibration`, `safety` (Lipschitz-ball
safety gates for self-improving updates), `tasks`, `training` (GRPO, CoDistill-GRPO, CausalRM);
imported on demand (`from jaxsample import steering`): `diffusion` (a masked-diffusion LM and
twisted SMC over its unmasking), `steering` (A-LQR and its baselines), `routing` (batch-level
query routing) and `testing` (exact enumeration and statistical checks for your own kernels).
"""

from jaxsample import calibration, errors, mcmc, models, parallel, safety, sampling, smc, tasks, training
from jaxsample.decoding import DecodeState, extend, init_decode, rewind, select_rows, take_rows
from jaxsample.generation import GenerateResult, generate
from jaxsample.lm import LanguageModel
from jaxsample.mcmc import PowerSampleResult, base_sample, best_of_n, power_sample, temperature_sample
from jaxsample.models import ModelConfig, Tokenizer, load, register_model, registered_models, save_pretrained
from jaxsample.models.intervention import Intervention
from jaxsample.sampling import Proposal, Twist, proposal_log_probs, token_log_probs
from jaxsample.scoring import score
from jaxsample.smc import SMCResult, learn_twist, smc_decode, twisted_smc

__version__ = "0.1.0"

__all__ = [
    "DecodeState",
    "GenerateResult",
    "Intervention",
    "LanguageModel",
    "ModelConfig",
    "PowerSampleResult",
    "Proposal",
    "SMCResult",
    "Tokenizer",
    "Twist",
    "base_sample",
    "calibration",
    "best_of_n",
    "errors",
    "extend",
    "generate",
    "init_decode",
    "learn_twist",
    "load",
    "mcmc",
    "models",
    "parallel",
    "power_sample",
    "proposal_log_probs",
    "register_model",
    "registered_models",
    "rewind",
    "score",
    "save_pretrained",
    "select_rows",
    "safety",
    "sampling",
    "smc",
    "smc_decode",
    "take_rows",
    "tasks",
    "training",
    "temperature_sample",
    "token_log_probs",
    "twisted_smc",
]
