"""Token-level sampling: temperature, top-k, top-p with exact proposal log-probabilities."""

from jaxsample.sampling.proposal import Proposal, proposal_log_probs, token_log_probs

__all__ = ["Proposal", "proposal_log_probs", "token_log_probs"]
