"""Test set-up: a private kernel cache fixture and the slow marker (CPU tensors run in the interpreter)."""
import os

import pytest



@pytest.fixture(scope="module")
def private_cache(tmp_path_factory, request):
    """A kernel cache of the test module's own (MOA_CACHE_DIR), so its cache effects are its own."""
    from moa.runtime import cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_CACHE_DIR", str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])))
        cache._LOADED.clear()
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes in the interpreter; run with MOA_SLOW=1 (make test-slow)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MOA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set MOA_SLOW=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
