"""Calibration: Conformal Selective Acting (anytime-valid selective risk) and ORCA.

`csa`: the CSA kernel (`init`, `build_kernel`, `deploy`, `run_stream`); `baselines`: A-RCPS,
ACI, CRC, LTT on the same scale; `isotonic`: the PAV calibration map; `ltt`: binomial
p-values and fixed-sequence testing; `orca`: the test-time-trained stopping probe, its
meta-training and LTT calibration of the stopping threshold.
"""

from jaxsample.calibration import baselines, csa, orca
from jaxsample.calibration.baselines import (
    ACIInfo,
    ACIState,
    aci_init,
    arcps_init,
    build_aci_kernel,
    build_arcps_kernel,
    crc_fit,
    ltt_fit,
)
from jaxsample.calibration.csa import CSAInfo, CSAState, run_stream
from jaxsample.calibration.isotonic import IsotonicFit, isotonic_fit, isotonic_predict
from jaxsample.calibration.ltt import binomial_p_value, fixed_sequence

__all__ = [
    "ACIInfo",
    "ACIState",
    "CSAInfo",
    "CSAState",
    "IsotonicFit",
    "aci_init",
    "arcps_init",
    "baselines",
    "binomial_p_value",
    "build_aci_kernel",
    "build_arcps_kernel",
    "crc_fit",
    "csa",
    "fixed_sequence",
    "isotonic_fit",
    "isotonic_predict",
    "ltt_fit",
    "orca",
    "run_stream",
]
