"""saebench_poly: are SAE latents more monosemantic than the model's own neurons, and at what rate and distortion?"""

import os

__version__ = "0.1.0"

# MKL's matrix products must not depend on where their operands lie in memory, so that re-runs and resumed runs on
# one CPU are bit-identical: its strict conditional numerical reproducibility (no measurable cost on these CPUs).
# MKL reads it when it first runs; set MKL_CBWR yourself to choose another mode (README, Reproducibility).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
