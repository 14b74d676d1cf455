"""The engine: a transformers ``Cache`` whose layers apply a policy, and the attention function that feeds it.

Modules, each with one job (see ``docs/architecture.md``):

* :mod:`~kvpolicy.core.policy` — the part contract (``LayerView``, ``AttentionStat``, ``Reduction``, ``CachePolicy``,
  the part protocols); :mod:`~kvpolicy.core.budget` — how much survives (``Budget``, ``BudgetAllocator``);
* :mod:`~kvpolicy.core.cache` — ``PolicyCache``; :mod:`~kvpolicy.core.layer` — ``PolicyLayer``, transformers' layer
  interface and the prefill/decode stage machine; :mod:`~kvpolicy.core.prefillstage` — a layer's prefill stage (and
  its waiting for the end of the forward); :mod:`~kvpolicy.core.probe` — the probe pass (a constructed input after
  the prefill, KVzip); :mod:`~kvpolicy.core.window` — sliding-window layers (the window
  rule, what such a layer holds uncompressed); :mod:`~kvpolicy.core.features` — attention features refused before any
  forward (logit soft-capping, learned sinks);
* :mod:`~kvpolicy.core.storage` — the storage interface and the padded layout; :mod:`~kvpolicy.core.buckets` — the
  bucketed layout for per-head budgets;
* :mod:`~kvpolicy.core.attention` — the registered attention function (chooses a path);
  :mod:`~kvpolicy.core.statistics` — a step's declared statistics (shared with a replay);
  :mod:`~kvpolicy.core.recording` / :mod:`~kvpolicy.core.replay` — one prefill recorded, replayed per policy;
  :mod:`~kvpolicy.core.kernels` — grouped attention and the statistics kernels; :mod:`~kvpolicy.core.masks` — the
  engine's per-slot mask;
* :mod:`~kvpolicy.core.selection` — the shared ranking rule; :mod:`~kvpolicy.core.positions` — the
  compressed-positions quirk; :mod:`~kvpolicy.core.token_types` — text / image / generated columns;
* :mod:`~kvpolicy.core.engine` — ``attach`` / ``make_cache``; :mod:`~kvpolicy.core.partcheck` — checks of part
  outputs; :mod:`~kvpolicy.core.reuse` — the cache-reuse guard.

The core imports nothing from the apps around it (evaluation, sweeps, bench, command line, policy documents, plugin
registry); they build on it. Nothing is imported here, so ``import kvpolicy.core`` stays free of torch.
"""
