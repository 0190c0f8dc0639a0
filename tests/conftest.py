"""Put tests/ on sys.path so test files can `from layouts import write_voc` in any import mode,
and share the one slow fixture: the toy world's ci() tiny CLIP, pre-trained once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def toy_ci_checkpoint(tmp_path_factory):
    """(cache dir, checkpoint path) of ToyConfig.ci() pre-trained with seed 0, deterministically."""
    from reclip.toy.pretrain import ToyConfig, get_or_train

    cache = tmp_path_factory.mktemp("toy_cache")
    # pre-training runs on one thread itself: the result cannot depend on the machine's core count
    return cache, get_or_train(cache, ToyConfig.ci(), seed=0, progress=False)
