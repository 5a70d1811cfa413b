"""jaxsample: inference-time reasoning methods for LLMs in JAX."""

from jaxsample import errors
from jaxsample.decoding import DecodeState, extend, init_decode, rewind, select_rows, take_rows
from jaxsample.generate import GenerateResult, generate
from jaxsample.lm import LanguageModel
from jaxsample.sampling import Proposal, proposal_log_probs, token_log_probs

__version__ = "0.1.0"
