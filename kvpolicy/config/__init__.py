"""Policies as users write them: pydantic models, validation with precise messages, presets, quirks.

A policy document (YAML or a dict) names its parts and budget::

    name: fast_elastic         # optional label for reports (default: the file's stem, else the preset's name)
    preset: elastic            # optional: start from a registered preset
    encode: {name: frequency, per_head: true}
    decode: {name: distance_offset, offset: -25}
    reducer: anchor_merge      # a bare name is the same as {name: anchor_merge}
    ratio: 0.2                 # or tokens: 256 (exactly one)
    decode_budget: fraction    # fraction | fixed | off (default: fraction for a ratio, fixed for tokens)
    reference_quirks: true     # or {ranking: true, drop_after_attention: true}
    evaluation: {model: smollm2-135m, task: continuation, samples: 8}   # optional: how it was measured (read by
                               # `kvpolicy run`, ignored by the policy; a sweep's best_policy.yaml carries one)

Resolution, in order (:func:`resolve_policy`):

1. **Layers.** The user's document, then each dotted ``overrides`` entry (``{"encode.per_head": True}``, what a sweep
   sets) on top of it; then the whole result on top of the preset's document (presets may themselves name a preset).
   Merging one layer onto another: a field set in the upper layer wins; a part written with the *same* name (or with no
   name) keeps the lower layer's parameters and overrides only those it sets (deep merge); a part with a *different*
   name replaces the lower one wholesale; ``null`` removes a part; setting ``ratio`` or ``tokens`` replaces the lower
   layer's budget (both fields); ``reference_quirks`` mappings merge key by key.
2. **Validation** of every field, every part name (against the registry), every part parameter (against the part's
   pydantic model, unknown parameters rejected), the budget, the quirk names and the capability tags
   (a reducer's ``requires`` must be covered by each present scorer's ``provides``). All problems are collected and
   raised as one :class:`PolicyConfigError` whose lines read ``field.path: what is wrong; what is allowed``.
3. **Quirks.** A part's parameter model may declare ``quirk_<name>: bool`` fields (reproductions of the original code's
   behaviour). ``reference_quirks: true`` turns on every quirk of every part in the policy plus the engine quirks
   ``drop_after_attention`` and ``compressed_positions`` (fields of :class:`~kvpolicy.policy.CachePolicy`); a mapping
   sets only the quirks it names (``ranking`` targets every part declaring ``quirk_ranking``; ``encode.ranking`` only
   the encode scorer). A quirk parameter written explicitly on a part always wins over ``reference_quirks``. A quirk
   name is an error unless some part of the final policy declares it — except a name inherited from a preset whose
   part the user replaced, which is dropped silently (presets themselves are checked strictly by
   :func:`preset_problems`, which ``kvpolicy plugins`` shows).
4. **Defaults.** ``reducer`` defaults to the registered part ``evict`` (an error when none is registered). No
   ``encode`` scorer means no prefill compression; no ``decode`` scorer means no decode-stage drops.

Only then are parts built (:func:`load_policy`), each by its ``PartSpec.factory(validated_params)``.
:func:`policy_to_dict` writes a resolved policy back as a plain, fully explicit document (no preset, every parameter
spelled out) that loads to the same policy.

Where each piece lives: :mod:`.spec` (the models a user writes, :class:`PolicyConfigError`), :mod:`.documents`
(reading, merging, overrides, presets), :mod:`.resolve` (one function per step above), :mod:`.sinks` (the policy's
protected sinks), :mod:`.build` (:class:`ResolvedPolicy` -> :class:`~kvpolicy.policy.CachePolicy`,
:func:`policy_to_dict`). Error messages come from :mod:`kvpolicy.errors`, parameter descriptions from
:mod:`kvpolicy.params`.
"""

from __future__ import annotations

from ..errors import ConfigError, ConfigIssue, issues_from_validation
from .build import ResolvedPart, ResolvedPolicy, policy_to_dict
from .documents import merge_documents, nest_overrides, read_policy_document
from .resolve import load_policy, preset_problems, resolve_policy
from .spec import (
    BUDGET_FIELDS,
    ENGINE_CAPABILITIES,
    ENGINE_QUIRKS,
    PART_FIELDS,
    PartRef,
    PolicyConfigError,
    PolicySpec,
)

__all__ = [
    "BUDGET_FIELDS",
    "ENGINE_CAPABILITIES",
    "ENGINE_QUIRKS",
    "PART_FIELDS",
    "ConfigError",
    "ConfigIssue",
    "PartRef",
    "PolicyConfigError",
    "PolicySpec",
    "ResolvedPart",
    "ResolvedPolicy",
    "issues_from_validation",
    "load_policy",
    "merge_documents",
    "nest_overrides",
    "policy_to_dict",
    "preset_problems",
    "read_policy_document",
    "resolve_policy",
]
