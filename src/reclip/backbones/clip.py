"""CLIP's ViT read densely: a dense-feature strategy (:mod:`reclip.features`) as a backbone."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from reclip.clip.model import CLIP
from reclip.features import DenseStrategy, FeatureContext, dense_features, get_strategy

__all__ = ["DenseCLIP"]


class DenseCLIP(nn.Module):
    """Frozen CLIP + a dense-feature strategy -> Z (B, D, h, w), float32, unit L2 norm per patch.

    Args:
        clip: a CLIP with a ViT image tower (registered as ``self.clip``, not copied).
        strategy: a preset name of :data:`reclip.features.STRATEGIES` or a
            :class:`~reclip.strategies.DenseStrategy` (e.g. a ``LastBlock``).

        aux: the strategy's auxiliary module, given instead of the one
            ``strategy.build_aux(clip)`` would build (e.g. a proxy model already in memory).

    Attributes:
        aux: the strategy's auxiliary module (``DenseStrategy.build_aux``, e.g. ProxyCLIP's
            proxy model), frozen, or None.

    ``forward`` runs under the caller's grad mode and autocast (see
    :func:`reclip.features.dense_features`); inputs that are not a multiple of the patch
    are padded at the bottom/right, so (h, w) = ceil((H, W) / patch). A strategy that reads
    the head's text queries gets them from :meth:`set_queries` (the head calls it).
    """

    def __init__(self, clip: CLIP, strategy: str | DenseStrategy = "maskclip", aux: nn.Module | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.strategy = get_strategy(strategy)
        if aux is None:
            aux = self.strategy.build_aux(clip)
        if aux is not None:
            aux = aux.to(next(clip.parameters()).device).eval().requires_grad_(False)
        self.aux = aux
        self._query_source: Callable[[], Tensor] | None = None

    def set_queries(self, source: Callable[[], Tensor]) -> None:
        """Where a strategy that reads the head's text queries gets them: ``source()`` ->
        the (S, D) query embeddings, the head's tensor as it is when Z is computed. A bound method of the HEAD (``QueryHead.queries``,
        ``RectifierHead.fixed_queries``): it follows ``.to(device)``, a state dict loaded
        later and a deep copy of the segmentor, and makes no reference cycle (the head
        holds nothing of the backbone), so a dropped segmentor is freed at once."""
        self._query_source = source

    def train(self, mode: bool = True) -> DenseCLIP:
        """The auxiliary module is frozen: whatever trains around it, it stays in eval mode."""
        super().train(mode)
        if self.aux is not None:
            self.aux.eval()
        return self

    @property
    def stride(self) -> int:
        """Input pixels per feature cell: the ViT patch size (or the strategy's own, e.g. a
        proxy model's patch for ProxyCLIP, whose Z lives on the proxy's grid)."""
        return self.strategy.stride(self.clip, self.aux)

    @property
    def embed_dim(self) -> int:
        """D, CLIP's joint embedding width."""
        return self.clip.visual.output_dim

    def context(self) -> FeatureContext:
        """What the strategy reads besides CLIP: the auxiliary module and the head's queries."""
        queries = self._query_source() if self._query_source is not None else None
        if self.strategy.needs_queries and queries is None:
            raise RuntimeError(f"strategy {self.strategy.kind!r} reads the head's text queries, but none were set "
                               f"(the head calls DenseCLIP.set_queries)")
        return FeatureContext(aux=self.aux, queries=queries)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) normalised -> Z (B, D, h, w)."""
        return dense_features(self.clip, images, self.strategy, self.context())
