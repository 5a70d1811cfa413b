"""`import jaxsample` stays light: the solvers it wraps load when first used."""

import os
import subprocess
import sys
from pathlib import Path


def test_import_loads_no_scipy_solvers_until_they_are_used():
    # scipy.optimize, scipy.stats and scipy.special took about 1 s of a 2.7 s import.
    script = """
import sys
import jaxsample
heavy = ("scipy.optimize", "scipy.stats", "scipy.sparse", "scipy.special")
print(*(name in sys.modules for name in heavy))
from jaxsample.calibration.isotonic import isotonic_fit
isotonic_fit([0.1, 0.4, 0.2], [0, 1, 0])
print("scipy.optimize" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1], env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False", "False", "True"]
