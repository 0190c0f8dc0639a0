"""DINO / DINOv2 ViTs (the proxy backbones of ProxyCLIP-style methods) with the official weights.

- :mod:`~reclip.backbones.dino.model`: the ViT in plain torch with the official parameter names
  (:class:`DinoViT`; ``patch_features(images, kind)`` -> (B, C, h, w));
- :mod:`~reclip.backbones.dino.load`: the official names and URLs (:data:`DINO_MODELS`), the checked
  download, strict loading of any official file (:func:`load_dino`).
"""

from reclip.backbones.dino.load import (
    DINO_MODELS,
    DinoWeights,
    DinoWeightsError,
    available_dino_models,
    download_dino,
    from_hf_dinov2,
    infer_dino_config,
    load_dino,
    random_dino,
    read_dino_state_dict,
)
from reclip.backbones.dino.model import (
    FEATURE_KINDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoConfig,
    DinoViT,
    interpolate_pos_embed,
)

__all__ = [
    "DINO_MODELS", "FEATURE_KINDS", "IMAGENET_MEAN", "IMAGENET_STD", "DinoConfig", "DinoViT", "DinoWeights",
    "DinoWeightsError", "available_dino_models", "download_dino", "from_hf_dinov2", "infer_dino_config",
    "interpolate_pos_embed", "load_dino", "random_dino", "read_dino_state_dict",
]
