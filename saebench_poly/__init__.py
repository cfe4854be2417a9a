"""saebench_poly: are SAE latents more monosemantic than the model's own neurons, and at what rate and distortion?"""

__version__ = "0.1.0"
