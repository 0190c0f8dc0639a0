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


def pytest_configure(config):
    config.addinivalue_line("markers", "real_proxy_loading: load proxy models by name for real (download path), "
                                       "not the tiny stand-in every other test gets")


@pytest.fixture(autouse=True)
def tiny_proxy_by_name(request, monkeypatch):
    """A proxy model asked for by NAME (ProxyCLIP's default ``dino_vitb8``) is a tiny random DINO:
    no weights exist here, and the tests that iterate every method build ProxyCLIP with its
    defaults. A path still loads the file; tests marked ``real_proxy_loading`` get the real
    loader (download, offline error)."""
    if request.node.get_closest_marker("real_proxy_loading"):
        yield
        return
    import reclip.backbones.dino as dino
    from tiny import tiny_dino

    real = dino.load_dino

    def load(spec, *args, **kwargs):
        if isinstance(spec, str) and spec in dino.DINO_MODELS:
            return tiny_dino()
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(dino, "load_dino", load)
    yield


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A tiny two-block CLIP written as an OpenAI checkpoint: what ``--clip`` reads in CLI tests."""
    from reclip.clip.load import save_clip
    from tiny import tiny_clip

    return save_clip(tiny_clip(vision_layers=2), tmp_path_factory.mktemp("clip") / "tiny.pt", format="openai")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """reclip's caches (text queries, downloads) in this test's own folder: ``RECLIP_CACHE``.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("isolated_cache")``."""
    monkeypatch.setenv("RECLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU OpenMP's
    spinning makes each op 10-30x slower with 2 threads; restored after the module. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
