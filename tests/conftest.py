"""Shared test fixtures. The tiny models, random views and trivial policies live in :mod:`kvpolicy.testing` (plugin
authors use them too); they are re-exported here for the test modules that import them from ``conftest``."""

from __future__ import annotations

import pytest

from kvpolicy.testing import (  # noqa: F401 - re-exported for the test modules
    IMAGE_TOKEN,
    LLAVA_IMAGE_TOKENS,
    PAD,
    VOCAB,
    FirstLast,
    KeepAll,
    PlainEvict,
    build_model,
    first_last_policy,
    keep_all_policy,
    make_batch,
)


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def text_family(request) -> str:
    return request.param
