"""Which ``generate()`` keyword hands transformers a cache: ``past_key_values`` (checked on the pinned 5.23.0).

transformers 5.23.0 neither deprecates ``generate(past_key_values=...)`` nor accepts ``generate(cache=...)`` (it
rejects it as an unused model kwarg), so the docs, examples and tests keep ``past_key_values``. Both checks below fail
as soon as a transformers release changes that, which is the signal to switch the spelling everywhere."""

from __future__ import annotations

import warnings

import pytest
import transformers

import kvpolicy
from conftest import PAD, build_model, first_last_policy, make_batch
from kvpolicy import Budget


@pytest.fixture(scope="module")
def model():
    return kvpolicy.attach(build_model("llama"))


def test_past_key_values_is_the_keyword_and_is_not_deprecated(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**make_batch(2, 12, [0, 2]), past_key_values=kvpolicy.make_cache(
            model, first_last_policy(Budget(ratio=0.5))), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 15)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == [], [str(w.message) for w in deprecations]


def test_cache_keyword_is_not_accepted_by_this_transformers(model):
    assert transformers.__version__.split(".")[0] == "5"
    with pytest.raises(ValueError, match=r"not used by the model: \['cache'\]"):
        model.generate(**make_batch(1, 8), cache=kvpolicy.make_cache(model, first_last_policy(Budget(ratio=0.5))),
                       max_new_tokens=2, do_sample=False, pad_token_id=PAD)
