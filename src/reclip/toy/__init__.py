"""The toy world: synthetic captioned photos and segmentation scenes, and tiny-CLIP pre-training.

``world`` renders the data (numpy only); ``pretrain`` pre-trains a tiny CLIP on it
(``ToyConfig.default()`` for the demo, ``ToyConfig.ci()`` for tests) and caches it;
``dino`` pre-trains a tiny DINO on its images (ProxyCLIP's proxy; ``multicrop`` is DINO's
augmentation) and caches it the same way.
"""

from .dino import ToyDinoConfig, get_or_train_dino, toy_proxy
from .pretrain import ToyConfig, get_or_train, load_checkpoint, pretrain_tiny_clip, zero_shot_accuracy
from .world import BACKGROUND_NAME, CLASSES, ToyWorld, WorldConfig, write_voc_layout

__all__ = [
    "BACKGROUND_NAME",
    "CLASSES",
    "ToyConfig",
    "ToyDinoConfig",
    "ToyWorld",
    "WorldConfig",
    "get_or_train",
    "get_or_train_dino",
    "load_checkpoint",
    "pretrain_tiny_clip",
    "toy_proxy",
    "write_voc_layout",
    "zero_shot_accuracy",
]
