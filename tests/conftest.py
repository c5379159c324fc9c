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
