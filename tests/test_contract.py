"""One battery for every registered method and every dense strategy, driven by the registries:
a new method or strategy gets these checks without a new test.

Every method: build (trained families: an untrained model saved as a run and loaded back
through the registry, by its config.json's "method") -> forward on a tiny random CLIP ->
logits (B, S, H, W) covering the input, finite, one channel per query; published test
settings on every shipped protocol and a whole segmentation through the inference layer.
Every strategy: dense features of the right shape, finite, unit norm.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reclip.data.protocol import list_protocols, load_protocol
from reclip.features import STRATEGIES, FeatureContext, dense_features, get_strategy
from reclip.inference import InferenceConfig, segment
from reclip.methods import FAMILIES, METHODS, build_segmentor, get_family, inference_config, load_trained
from reclip.text import Vocabulary
from tiny import tiny_clip, tiny_dino_file

VOCABULARY = Vocabulary.from_names(["background", "cat", "dog, puppy", "sky"])  # a synonym: S = 5 > C = 4
IMAGES = torch.randn(2, 3, 30, 45, generator=torch.Generator().manual_seed(0))  # not a multiple of the patch


@pytest.fixture(scope="module")
def clip():
    # two vision blocks: strategies that read a block before the last (ResCLIP's RCS) need one
    return tiny_clip(perturb=0.02, vision_layers=2)


@pytest.fixture(scope="module")
def proxy_file(tmp_path_factory):
    """A tiny DINO checkpoint: the proxy model of strategies that have one (ProxyCLIP)."""
    return tiny_dino_file(tmp_path_factory.mktemp("proxy") / "tiny_dino.pth")


def offline_overrides(name: str, proxy_file) -> dict:
    """Strategy overrides that keep a method offline: a proxy model from a file, not a download."""
    method = METHODS[name]
    if get_family(method).trained or not hasattr(STRATEGIES[method.strategy], "proxy"):
        return {}
    return {"proxy": str(proxy_file)}


@pytest.fixture(scope="module")
def segmentors(clip, proxy_file, tmp_path_factory):
    """name -> (segmentor from the registry, the model it was saved from or None)."""
    out = {}
    for name, method in METHODS.items():
        family = get_family(method)
        if family.trained:
            model = family.new_model(method, clip, VOCABULARY, text_cache=False).eval()
            run = tmp_path_factory.mktemp(name.replace("+", "p"))
            family.write_run(run, model, method, clip, VOCABULARY)
            out[name] = (build_segmentor(name, clip, VOCABULARY, checkpoint=run, text_cache=False), model, run)
        else:
            segmentor = build_segmentor(name, clip, VOCABULARY, text_cache=False,
                                        strategy_overrides=offline_overrides(name, proxy_file))
            out[name] = (segmentor, None, None)
    return out


def test_every_family_is_complete():
    for family in FAMILIES.values():
        assert family.methods and all(m.family == family.name for m in family.methods)
        # every shipped protocol gives the family's section, as the family's settings dataclass
        assert all(isinstance(getattr(p, family.section), family.settings) for p in map(load_protocol, list_protocols()))


@pytest.mark.parametrize("name", list(METHODS))
def test_forward_contract(name, segmentors):
    segmentor, _, _ = segmentors[name]
    assert not segmentor.training
    with torch.no_grad():
        logits = segmentor(IMAGES)
    class_index = getattr(segmentor, "class_index", None)
    channels = VOCABULARY.num_classes if class_index is None else len(class_index)
    assert logits.shape == (2, channels, 30, 45) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if class_index is not None:
        assert class_index.tolist() == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if get_family(m).trained])
def test_trained_families_round_trip_through_the_registry(name, segmentors, clip):
    segmentor, model, run = segmentors[name]
    assert json.loads((run / "config.json").read_text())["method"] == name
    with torch.no_grad():
        torch.testing.assert_close(segmentor(IMAGES), model(IMAGES))
    assert torch.equal(load_trained(run, clip)(IMAGES[:1]), segmentor(IMAGES[:1]))  # no method given: config.json's
    other = next(n for n, m in METHODS.items() if n != name and get_family(m).trained)
    with pytest.raises(ValueError, match=f"--method {name}"):
        build_segmentor(other, clip, VOCABULARY, checkpoint=run, text_cache=False)


@pytest.mark.parametrize("name", list(METHODS))
def test_published_settings_and_a_whole_segmentation(name, segmentors):
    segmentor, _, _ = segmentors[name]
    for protocol in map(load_protocol, list_protocols()):
        assert isinstance(inference_config(name, protocol), InferenceConfig)
    image = np.random.default_rng(0).integers(0, 256, (27, 38, 3), dtype=np.uint8)
    cfg = inference_config(name, load_protocol("folder"), short_side=40, window=32, stride=16)
    result = segment(segmentor, image, cfg, background_index=None, return_probs=True)
    assert result.labels.shape == (27, 38) and result.labels.max() < VOCABULARY.num_classes
    assert result.probs.shape == (4, 27, 38) and np.isfinite(result.probs).all()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_gives_unit_dense_features(name, clip, proxy_file):
    queries = torch.nn.functional.normalize(torch.randn(5, clip.visual.output_dim), dim=-1)  # a head's W_q
    strategy = STRATEGIES[name]
    if hasattr(strategy, "proxy"):
        strategy = get_strategy(strategy, proxy=str(proxy_file))
    aux = strategy.build_aux(clip)  # what a backbone builds once
    context = FeatureContext(queries=queries, aux=aux)
    needs = strategy.needs_queries or aux is not None
    with torch.no_grad():
        z = dense_features(clip, IMAGES, strategy, context if needs else None)
    assert z.shape == (2, clip.visual.output_dim, 4, 6)  # ceil(30 / 8), ceil(45 / 8)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 6))


def test_a_backbone_must_give_the_input_over_its_stride():
    from torch import nn

    from reclip.segmentor import DenseSegmentor

    class Halving(nn.Module):  # claims stride 4 but pools by 8
        stride = 4

        def forward(self, images):
            return nn.functional.avg_pool2d(images, 8)

    class Identity(nn.Module):
        num_classes = 3

        def forward(self, z):
            return z

    with pytest.raises(RuntimeError, match="stride 4"):
        DenseSegmentor(Halving(), Identity())(torch.zeros(1, 3, 30, 45))
    Halving.stride = 8
    assert DenseSegmentor(Halving(), Identity())(torch.zeros(1, 3, 30, 45)).shape == (1, 3, 30, 45)
