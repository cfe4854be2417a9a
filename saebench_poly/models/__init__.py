"""Model loaders: each turns a model reference from a spec into a `ModelAdapter`.

Loaders register here by name (``transformer_lens``, ``hf``, ``toy``, ``incidental``) and, from other packages,
through the entry-point group ``saebench_poly.models``.
"""

from saebench_poly.models.base import Batch, ForwardOutput, ModelAdapter, ModelConfig
from saebench_poly.registry import Registry

MODEL_LOADERS: Registry = Registry("model loader", entry_point_group="saebench_poly.models")
MODEL_LOADERS.register("transformer_lens", "saebench_poly.models.hooked:load_hooked_transformer")
MODEL_LOADERS.register("hf", "saebench_poly.models.hf:load_hf_model")
MODEL_LOADERS.register("toy", "saebench_poly.models.toy:load_toy_model")
MODEL_LOADERS.register("incidental", "saebench_poly.models.incidental:load_incidental_model")

__all__ = ["MODEL_LOADERS", "Batch", "ForwardOutput", "ModelAdapter", "ModelConfig"]
