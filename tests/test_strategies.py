"""The dense-feature strategy contract (reclip.strategies.base, reclip.features): any
DenseStrategy works under every head, is written into a run's config.json and read
back, gets the head's text queries and its auxiliary module through its backbone, and
takes the per-dataset settings its method's own protocol section publishes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from layouts import write_voc
from tiny import tiny_clip
from reclip import api
from reclip.backbones import DenseCLIP
from reclip.data.protocol import load_protocol
from reclip.features import (
    STRATEGIES,
    STRATEGY_KINDS,
    DenseStrategy,
    FeatureContext,
    LastBlock,
    dense_features,
    get_strategy,
    project_patches,
    strategy_from_dict,
    strategy_to_dict,
)
from reclip.heads.rectify import RectifierConfig
from reclip.heads.zero_shot import ZeroShotSegmentor
from reclip.methods import build_segmentor, published_strategy_overrides
from reclip.text import QueryEmbeddings, Vocabulary, query_embeddings


@dataclass(frozen=True)
class QueryAware(DenseStrategy):
    """A test strategy: CLIP's raw tokens, each patch pushed towards the query it is closest
    to (by ``pull``), through an auxiliary linear map built once."""

    kind = "query_aware_test"
    needs_queries = True
    pull: float = 0.5
    layers: tuple[int, ...] = (0,)

    def build_aux(self, clip):
        return nn.Linear(clip.visual.output_dim, clip.visual.output_dim)

    def features(self, clip, images, context=None):
        tokens, grid = clip.visual.forward_blocks(images)
        z = project_patches(clip, tokens, grid)  # (B, D, h, w)
        q = context.queries.float()  # (S, D)
        best = torch.einsum("bdhw,sd->bshw", z, q).argmax(1)  # (B, h, w)
        z = z + self.pull * q[best].permute(0, 3, 1, 2)
        z = torch.einsum("bdhw,ed->behw", z, context.aux.weight)
        return torch.nn.functional.normalize(z, dim=1)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(0, perturb=0.1, vision_layers=2)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(STRATEGY_KINDS, QueryAware.kind, QueryAware)
    monkeypatch.setitem(STRATEGIES, "query_aware", QueryAware())


def queries(clip, names=("cat", "dog", "sky")) -> QueryEmbeddings:
    return query_embeddings(clip, Vocabulary.from_names(list(names)), "single", cache_dir=False)


def test_a_last_block_is_written_as_runs_always_wrote_it_and_other_kinds_name_theirs(registered):
    block = get_strategy("naclip", gaussian_sigma=2.0)
    assert strategy_to_dict(block) == dataclasses.asdict(block)  # no "kind": old run identities unchanged
    assert strategy_from_dict(strategy_to_dict(block)) == block
    other = QueryAware(pull=0.25, layers=(1, 2))
    data = strategy_to_dict(other)
    assert data == {"kind": "query_aware_test", "pull": 0.25, "layers": [1, 2]}
    assert strategy_from_dict(data) == other  # the tuple comes back a tuple
    config = RectifierConfig(strategy=other)
    assert RectifierConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown dense-feature strategy kind 'nope'"):
        strategy_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match=r"unknown QueryAware field\(s\) \['gamma'\]"):
        strategy_from_dict({"kind": "query_aware_test", "gamma": 1})
    with pytest.raises(ValueError, match=r"unknown QueryAware field\(s\) \['sigma'\]"):
        get_strategy("query_aware", sigma=1)


def test_the_backbone_gives_a_strategy_the_heads_queries_and_its_frozen_aux_module(clip, registered):
    q = queries(clip)
    segmentor = ZeroShotSegmentor(clip, q, "query_aware")
    backbone = segmentor.backbone
    assert isinstance(backbone.aux, nn.Linear) and not backbone.aux.training
    assert not any(p.requires_grad for p in backbone.aux.parameters())
    assert any(name.startswith("backbone.aux.") for name, _ in segmentor.named_parameters())  # moves with .to()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    context = FeatureContext(aux=backbone.aux, queries=q.weights)
    expected = dense_features(clip, x, QueryAware(), context)
    torch.testing.assert_close(backbone(x), expected)
    # the queries matter: other queries give other features
    other = ZeroShotSegmentor(clip, queries(clip, ("tree", "car", "road")), "query_aware")
    other.backbone.aux.load_state_dict(backbone.aux.state_dict())
    assert not torch.allclose(other.backbone(x), expected)
    # a backbone without a head that sets queries says so
    with pytest.raises(RuntimeError, match="reads the head's text queries"):
        DenseCLIP(clip, "query_aware")(x)


def test_a_methods_own_section_publishes_its_strategy_settings_and_the_users_win(tmp_path, clip, monkeypatch):
    protocol = load_protocol("voc21").with_overrides(naclip={
        "short_side": 32, "mode": "whole", "window": None, "stride": None, "logit_scale": 40.0, "prob_thd": None,
        "strategy": {"gaussian_sigma": 2.0}})
    assert published_strategy_overrides("naclip", protocol) == {"gaussian_sigma": 2.0}
    assert published_strategy_overrides("clearclip", protocol) == {}  # not naclip's own method
    assert published_strategy_overrides("naclip", load_protocol("voc21")) == {}
    root = write_voc(tmp_path / "voc", n_val=1)
    fast = {"short_side": 24, "mode": "whole"}
    # applied under the common protocol too (the test settings come from zero_shot here)
    result = api.evaluate(clip, "naclip", protocol, root, templates="single", inference=fast, progress=False)
    assert result.settings["test_settings"] == "zero_shot"
    assert result.settings["strategy"]["gaussian_sigma"] == 2.0
    result = api.evaluate(clip, "naclip", protocol, root, templates="single", inference=fast, progress=False,
                          strategy_overrides={"gaussian_sigma": 3.0})
    assert result.settings["strategy"]["gaussian_sigma"] == 3.0
    # one mechanism (build_segmentor's protocol=) for every place that builds for a protocol
    vocabulary = Vocabulary.from_names(["background", "cat"])
    assert build_segmentor("naclip", clip, vocabulary, protocol=protocol, text_cache=False).strategy.gaussian_sigma == 2.0
    built = []
    real = api.build_segmentor
    monkeypatch.setattr(api, "build_segmentor", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    api.proposal_source("from:naclip", clip, vocabulary, protocol, background=True, text_cache=False)
    assert built[-1].strategy.gaussian_sigma == 2.0  # proposals made with the dataset's settings too
    with pytest.raises(Exception, match=r"naclip: strategy = \[1, 2\] has type list"):
        load_protocol("voc21").with_overrides(naclip={
            "short_side": 32, "mode": "whole", "window": None, "stride": None, "logit_scale": 40.0,
            "prob_thd": None, "strategy": [1, 2]})


def test_last_block_is_a_dense_strategy_with_its_kind():
    assert isinstance(STRATEGIES["maskclip"], DenseStrategy) and STRATEGY_KINDS["last_block"] is LastBlock


def test_the_strategy_reads_the_heads_queries_as_they_are_and_its_aux_stays_frozen(clip, registered):
    import copy

    segmentor = ZeroShotSegmentor(clip, queries(clip), "query_aware")
    assert set(segmentor.state_dict()) == set(ZeroShotSegmentor(clip, queries(clip)).state_dict()) | {
        f"backbone.aux.{k}" for k in segmentor.backbone.aux.state_dict()}  # the queries are stored once, by the head
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = segmentor.backbone(x)
    other = queries(clip, ("tree", "car", "road"))
    segmentor.head.load_state_dict({"text_weights": other.weights, "class_index": other.class_index})
    after = segmentor.backbone(x)  # read when Z is computed: the loaded queries, not a stale copy
    assert not torch.allclose(before, after)
    twin = copy.deepcopy(segmentor)  # a copy reads its own head's queries
    assert twin.backbone.context().queries is twin.head.text_weights
    twin.head.text_weights.mul_(-1)
    assert not torch.allclose(twin.backbone(x), after)
    torch.testing.assert_close(segmentor.backbone(x), after)
    segmentor.to(torch.float64)  # a conversion makes new tensors: still the head's
    assert segmentor.backbone.context().queries is segmentor.head.text_weights
    segmentor.train()
    assert segmentor.backbone.training and not segmentor.backbone.aux.training
    # no reference cycle: a dropped segmentor (its aux model, on a GPU its memory) is freed at once
    import gc
    import weakref

    gc.disable()
    try:
        ref = weakref.ref(segmentor)
        del segmentor, twin
        assert ref() is None
    finally:
        gc.enable()
