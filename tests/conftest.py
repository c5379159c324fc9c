"""Shared pytest set-up: the `slow` and `gpu` markers.

`make test` (and CI) runs `pytest -m "not slow"`: a `gpu` test on a machine without CUDA is skipped with its
reason shown (`-rs`) — never passed silently, and on a GPU machine it runs.
"""
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: too slow for CI (2 CPU cores, 90 min including install); run with -m slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason when torch.cuda is unavailable")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for it in gpu_items: it.add_marker(skip)


@pytest.fixture(scope="session")
def ml_raw(tmp_path_factory):
    "Real ML-100K raw tables through the assets stage (offline wheel), into a temporary results folder (once per session)."
    from usermirror_nb.assets import load_raw, run_assets
    from usermirror_nb.config import config_from_dict
    root = tmp_path_factory.mktemp("results")
    cfg = config_from_dict({"profile": "t", "results_root": str(root), "assets": {"models": []},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}]})
    run_assets(cfg)
    return load_raw(cfg.results_dir / "assets" / "raw" / "movielens")
