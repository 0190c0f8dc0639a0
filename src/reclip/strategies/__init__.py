"""Dense-feature strategies, one file per family of methods (:mod:`reclip.features` holds
the registry of presets by name).

- :mod:`~reclip.strategies.base`: what a strategy is (:class:`DenseStrategy`) and what it
  may read (:class:`FeatureContext`);
- :mod:`~reclip.strategies.last_block`: methods that change only CLIP's last block
  (MaskCLIP, SCLIP, ClearCLIP, NACLIP), ClearCLIP's decomposition :class:`LastBlock`;
- :mod:`~reclip.strategies.sc_clip`: SC-CLIP's self-calibration (:class:`SelfCalibrated`:
  LOF outliers, mid-layer similarity aggregation, multi-level fusion);
- :mod:`~reclip.strategies.resclip`: ResCLIP's residual attention on a last block
  (:class:`ResidualAttention`: RCS and semantic feedback);
- :mod:`~reclip.strategies.proxyclip`: ProxyCLIP's proxy attention (:class:`ProxyAttention`:
  a DINO's patch similarities over CLIP's values, :mod:`reclip.backbones.dino`).
"""

from reclip.strategies.base import DenseStrategy, FeatureContext, project_patches
from reclip.strategies.last_block import LastBlock
from reclip.strategies.proxyclip import ProxyAttention
from reclip.strategies.resclip import ResidualAttention
from reclip.strategies.sc_clip import SelfCalibrated

__all__ = ["DenseStrategy", "FeatureContext", "LastBlock", "ProxyAttention", "ResidualAttention", "SelfCalibrated",
           "project_patches"]
