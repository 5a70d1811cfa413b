"""Token-level sampling: temperature / top-k / top-p / twisted proposals with exact log-probabilities."""

from jaxsample.sampling.proposal import (
    Proposal,
    TokenDraw,
    Twist,
    categorical,
    draw_tokens,
    proposal_log_probs,
    token_log_probs,
    twisted_log_probs,
)

__all__ = ["Proposal", "TokenDraw", "Twist", "categorical", "draw_tokens", "proposal_log_probs", "token_log_probs", "twisted_log_probs"]
