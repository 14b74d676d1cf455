"""D2O: per-layer budgets from attention density, and a similarity-threshold merge of evicted entries.

Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient Generative Inference of Large Language
Models" (arXiv 2406.13035; ICLR 2025 as "... for Efficient Long-Context Inference ..."; authors' code
github.com/AIoT-MLSys-Lab/d2o, commit 12c99d8, ``LLM_merge_new/LMEval_kv_token_merge/modeling_llama3_7b_13b_d2o.py:
D2O_LayerKVCache`` and ``modeling_llama3_new.py`` for the layer allocation).

* ``d2o`` (allocator): layer ``l`` keeps ``L * keep * softmax(-v)_l`` entries, ``v_l`` the layer's attention
  density (the code's normalised attention variance, :func:`layer_densities`): dense layers (low variance) keep more.
  Measured on each prompt when the prefill is shared (a replay sees every layer first, :func:`prompt_densities`);
  on the direct path the engine calls an allocator per layer *before* the next layer has run, so the densities are
  a parameter there (measured beforehand), uniform budgets without them — see the class docstring;
* ``d2o`` (encode scorer): accumulated attention per kv head (the same part as ``lookm``'s);
* ``d2o`` (reducer): 4 sinks + a recent window (a share of the budget) + the best-scored entries; every evicted
  entry whose best key cosine similarity to a kept entry reaches an EMA threshold is merged into that entry with
  similarity-softmax weights; decode-time victims likewise (``on_drop``), the threshold carried across steps;
* ``d2o`` (decode scorer): accumulated attention, 4 sinks and the recent window never dropped;
* preset ``d2o``: the authors' setting (heavy 10% + recent 10%: ``ratio: 0.8``, fixed budget while decoding).

See ``docs/merging.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.parts import (
    HeavyRecentDecode,
    Share,
    Tokens,
    accumulated_specs,
    build,
    consumer_spec,
    heavy_recent_select,
    merge_kv,
    most_similar,
    reduction_from_mask,
    row_mean,
    victim_mask,
)
from kvpolicy.core.policy import LayerView, ModelView, Reduction

PAPER = 'Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient Generative Inference of LLMs"'

#: ``view.layer_state`` key of the merge threshold, float64 ``[B]`` (NaN: not set yet for that row)
THRESHOLD_KEY = "d2o.threshold"


# ===================================================================================================== allocation


def layer_densities(
    attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
) -> list[float]:
    """D2O's per-layer attention density ``v_l`` from full prefill attention maps (as returned by
    ``model(..., output_attentions=True)`` with eager attention: one ``[B, heads, n, n]`` tensor per layer).

    As in the authors' code (``LlamaAttention3_D2O.forward``): the attention each key receives (column sums over the
    queries), its variance over the keys (unbiased), averaged over the batch, min-max normalised over the heads
    (``(x - min) / (max - min + 1e-6)``) and averaged over the heads. With ``attention_mask`` (``[B, n]``, 1 = real)
    pad queries and pad keys are left out, row by row (the code runs unpadded batches of 1). Values lie in [0, 1);
    note that with 2 heads every layer scores about 0.5 (min-max over two values), so the statistic needs the query
    heads, not the kv heads."""
    out = []
    for att in attentions:
        a = att.detach().to(torch.float64)
        b, _, q, n = a.shape
        per_row = []
        for r in range(b):
            if attention_mask is not None:
                real = attention_mask[r, -n:].to(torch.bool).to(a.device)
                rows = a[r][:, real[-q:]][:, :, real]
            else:
                rows = a[r]
            col = rows.sum(dim=-2)  # [heads, keys]
            per_row.append(col.var(dim=-1))  # unbiased, as torch.var's default
        out.append(normalised_density(torch.stack(per_row).mean(dim=0)))
    return out


def normalised_density(variance: torch.Tensor) -> float:
    """A layer's density from the per-head variance of the attention its keys receive (``[heads]``): min-max
    normalised over the heads, ``(x - min) / (max - min + 1e-6)``, then averaged, as the authors' code does."""
    var = variance.to(torch.float64)
    return float(((var - var.min()) / (var.max() - var.min() + 1e-6)).mean())


def prompt_densities(model: ModelView) -> list[list[float]]:
    """``[L][B]``: each policy layer's density on each row's own prompt, from the whole-model view of a shared prefill
    (:class:`~kvpolicy.core.policy.ModelView`): the attention each real key receives from the row's real queries,
    per query head, its variance over the keys (unbiased), normalised and averaged over the heads
    (:func:`normalised_density`) — :func:`layer_densities` on a batch of one unpadded prompt."""
    out = []
    for i, view in enumerate(model.layers):
        received = model.head_attention(i).to(torch.float64)  # [B, Hq, P]
        out.append([
            normalised_density(received[b][:, view.valid[b, 0]].var(dim=-1)) for b in range(view.batch_size)
        ])
    return out


def d2o_budgets(variances: Sequence[float], keep: int, n_tokens: int) -> list[int]:
    """Entries kept by every layer for one row: ``L * keep * softmax(-v)_l``, each layer in ``[1, n]``, summing to
    exactly ``L * keep``.

    Every layer first gets one entry; the remaining ``L (keep - 1)`` are water-filled in proportion to
    ``softmax(-v)`` with a cap of ``n - 1`` more (a capped layer's excess goes to the others in the same
    proportion), then rounded by largest remainder (ties to the lower layer)."""
    L, k = len(variances), int(keep)
    if L == 0:
        return []
    n = max(int(n_tokens), k)
    if L == 1 or k <= 0:
        return [k] * L
    v = [float(x) for x in variances]
    m = min(v)
    e = [math.exp(-(x - m)) for x in v]
    w = [x / sum(e) for x in e]
    extra, cap = L * (k - 1), n - 1
    capped: set[int] = set()
    c = 0.0
    while True:
        free = [i for i in range(L) if i not in capped]
        if not free:
            break
        c = (extra - len(capped) * cap) / sum(w[i] for i in free)
        new = {i for i in free if c * w[i] > cap}
        if not new:
            break
        capped |= new
    real = [float(cap) if i in capped else c * w[i] for i in range(L)]
    base = [min(cap, math.floor(x)) for x in real]
    rest = extra - sum(base)
    by_frac = sorted(range(L), key=lambda i: (-(real[i] - base[i]), i))
    while rest > 0:
        moved = False
        for i in by_frac:
            if rest == 0:
                break
            if base[i] < cap:
                base[i] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return [1 + x for x in base]


class D2OAllocatorParams(BaseModel):
    """Parameters of the ``d2o`` allocator."""

    model_config = ConfigDict(extra="forbid")

    variances: list[float] | None = Field(
        default=None,
        max_length=4096,
        description="per-layer attention density v_l (one per decoder layer, e.g. from kvpolicy_plugins.d2o."
        "layer_densities on an eager run); layer l keeps L * budget * softmax(-v)_l. null: measured per prompt when "
        "the prefill is shared (per_prompt), else uniform budgets (see docs/merging.md)",
    )
    per_prompt: bool = Field(
        default=True,
        description="when the prefill is shared (replayed from a recording, which sees every layer before any is "
        "compressed): densities measured on each prompt itself, as the paper allocates; ignored when variances are "
        "given. The direct path cannot (it compresses layer by layer): there, and with false, the budgets are uniform",
    )
    quirk_skip_layers: bool = Field(
        default=False,
        description="authors' code: layers 0, 1 and L-1 are never compressed (they keep every entry, on top of the "
        "budgets the other layers get)",
    )


class D2OAllocator:
    """D2O's layer-level allocation (``d2o`` allocator).

    Wan et al., 2024, "D2O: Dynamic Discriminative Operations": attention is dense in some layers (shallow ones) and
    sparse in others; a dense layer loses more when evicted, so it keeps more entries. The authors' code measures
    each layer's density at prefill (:func:`layer_densities`: normalised variance of the attention received), then
    sets layer ``l``'s kept fraction to ``clamp(L * rho * softmax(-v)_l, 0.01, 1)`` (``rho`` = the uniform kept
    fraction) — the mean over layers is the uniform budget.

    kvpolicy computes ``L * keep * softmax(-v)_l`` per row, water-filled so that each layer keeps between 1 and
    ``n`` entries and the layers of a row sum to exactly ``L * keep`` (:func:`d2o_budgets`; the code's clamp to
    ``[0.01, 1]`` of the prompt loses the excess instead).

    **Per prompt only with a shared prefill.** The direct path calls ``layer_keep`` for layer ``l`` right after that
    layer's prefill attention, before layer ``l + 1`` runs, so the softmax over every layer's density of *this*
    prompt cannot be formed there (the authors' code defers the prompt's compression to the first decode step for
    that reason): it uses the ``variances`` parameter (densities measured beforehand on calibration prompts, a model
    property in the paper's observation), or uniform budgets without them. A prefill replayed from a recording
    (``kvpolicy.core.replay``) has every layer before any is compressed: there :meth:`model_keep` measures the
    densities of each prompt (:func:`prompt_densities`) and allocates from them (``per_prompt``, on by default), and
    the result's ``allocation`` says ``whole-model``.

    Other deviations: ``quirk_skip_layers`` reproduces the code's uncompressed layers 0, 1 and ``L - 1``; the code's
    per-layer sizes ``int(T * ratio_l * hh_share) + int(T * ratio_l * recent_share)`` are not reproduced (exact totals
    instead)."""

    def __init__(self, params: D2OAllocatorParams | None = None, **kwargs: Any):
        self.params = build(D2OAllocator, D2OAllocatorParams, params, kwargs)

    def layer_keep(self, layer_idx: int, num_layers: int, keep: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        prm = self.params
        if prm.variances is None:
            out = keep.tolist()
        else:
            if len(prm.variances) != num_layers:
                raise ValueError(
                    f"d2o allocator: {len(prm.variances)} variances given for a model with {num_layers} layers"
                )
            out = [d2o_budgets(prm.variances, int(k), int(n))[layer_idx] for k, n in zip(keep.tolist(), n_tokens.tolist())]
        return self._skip(out, layer_idx, num_layers, n_tokens)

    def model_keep(self, model: ModelView) -> torch.Tensor | None:
        """Per-prompt budgets ``[L, B]`` from the whole-model view of a shared prefill (``None`` when ``variances`` are
        given or ``per_prompt`` is off: the per-layer rule then applies). The budgets spread ``L * keep`` entries over
        the ``L`` policy layers of each row."""
        prm = self.params
        if prm.variances is not None or not prm.per_prompt:
            return None
        dens = prompt_densities(model)
        rows = [
            d2o_budgets([d[b] for d in dens], int(k), int(n))
            for b, (k, n) in enumerate(zip(model.keep.tolist(), model.n_tokens.tolist()))
        ]
        out = [
            self._skip([row[i] for row in rows], view.layer_idx, view.num_layers, model.n_tokens)
            for i, view in enumerate(model.layers)
        ]
        return torch.stack(out)

    def _skip(self, out: list[int], layer_idx: int, num_layers: int, n_tokens: torch.Tensor) -> torch.Tensor:
        """The authors' uncompressed layers 0, 1 and L - 1 (``quirk_skip_layers``) on top of budgets ``out``."""
        if self.params.quirk_skip_layers and num_layers > 0 and layer_idx in {0, 1, num_layers - 1}:
            out = [max(int(k), int(n)) for k, n in zip(out, n_tokens.tolist())]
        return torch.tensor(out, dtype=torch.long, device=n_tokens.device)


# ===================================================================================================== reducer


class D2OWindow(BaseModel):
    """The entries D2O never evicts, shared by its reducer and its decode scorer (the authors' code has one setting
    for both): the sinks and a recent window."""

    model_config = ConfigDict(extra="forbid")

    start_size: Tokens = Field(default=4, description="oldest entries always kept, never dropped (sinks; code: 4)")
    recent_share: Share = Field(
        default=0.5,
        description="recent window as a share of the layer's budget (while decoding: the entries held after "
        "prefill), always kept, never dropped (the authors' hh_ratio = recent_ratio = 0.1: 0.5)",
    )
    recent: Tokens | None = Field(default=None, description="recent window in tokens (overrides recent_share)")


class D2OParams(D2OWindow):
    """Parameters of the ``d2o`` reducer."""

    ema: Share = Field(
        default=0.5,
        description="threshold update tau <- ema * tau + (1 - ema) * mean best similarity of this compression's "
        "evicted entries (the first compression sets tau to that mean; code: alpha = beta = 0.5)",
    )
    decode_merge: bool = Field(
        default=True, description="merge decode-time victims (with the running threshold); false: evict them"
    )
    quirk_code_weights: bool = Field(
        default=False,
        description="authors' code: kept entry = mean of itself and similarity-scaled sources, (x_c + sum u x_e) / "
        "(1 + n); off: the paper's softmax weights (e x_c + sum exp(u) x_e) / (e + sum exp(u))",
    )


class D2OReducer:
    """D2O's token-level compression (``d2o`` reducer).

    Wan et al., 2024, "D2O: Dynamic Discriminative Operations": evict as H2O does (heavy hitters + recent window),
    then *re-discriminate* the evicted entries: one whose key is similar enough to a kept entry is recalled and merged
    into it; the others are dropped. "Similar enough" is a threshold maintained by an exponential moving average.

    As implemented, per row and kv head with ``k`` = the layer's budget (``d2o`` allocator):

    1. keep the ``start_size`` oldest entries (4, as the code), the newest ``floor(recent_share * k)`` (the code's
       recent_ratio) and the best-scored others (:func:`kvpolicy.parts.heavy_recent_select`);
    2. each evicted entry ``e`` finds the kept entry ``c`` of the same kv head with the highest key cosine similarity
       ``u_e`` (ties to the older entry);
    3. threshold, per batch row and layer (``layer_state['d2o.threshold']``): ``m`` = the mean of ``u_e`` over the
       row's evicted entries of all kv heads; the first compression sets ``tau = m``, every later one (decode drops
       included) ``tau = ema * tau + (1 - ema) * m`` — *before* filtering, as the code does; ``e`` is merged iff
       ``u_e >= tau``;
    4. merge (keys and values, the same weights): ``x_c = (e x_c + sum exp(u_e) x_e) / (e + sum exp(u_e))``, a
       softmax over the similarities to ``c`` of ``c`` itself (1) and its merged entries — our reading of the paper's
       weighted merge; ``quirk_code_weights`` gives the code's ``(x_c + sum u_e x_e) / (1 + n)``.

    Deviations from the authors' code: (a) the code compresses the prompt at the first decode step, with that step's
    attention added to the scores; kvpolicy compresses at prefill from the prompt's attention; (b) the code compares
    the *head-averaged* best similarity of the i-th evicted entry of each head (different tokens when heads choose
    differently) with the threshold; kvpolicy compares each (head, entry)'s own similarity; (c) GQA: per kv head;
    (d) per batch row (the code: batch 1, scores summed over the batch); (e) layers 0, 1 and ``L - 1`` are
    compressed like the others unless the allocator's ``quirk_skip_layers`` is on."""

    def __init__(self, params: D2OParams | None = None, **kwargs: Any):
        self.params = build(D2OReducer, D2OParams, params, kwargs)

    @property
    def strategy(self) -> str:
        return "weighted" if self.params.quirk_code_weights else "softmax"

    def threshold(self, view: LayerView, sources: torch.Tensor, sim: torch.Tensor, reset: bool) -> torch.Tensor:
        """Update and return the per-row threshold (float64 ``[B]``) from this compression's evicted entries."""
        m = row_mean(sim, sources)
        prev = None if reset else view.layer_state.get(THRESHOLD_KEY)
        if prev is None or prev.shape != m.shape:
            prev = torch.full_like(m, float("nan"))
        prev = prev.to(m.device, torch.float64)
        ema = float(self.params.ema)
        tau = torch.where(torch.isnan(prev), m, ema * prev + (1.0 - ema) * m)
        tau = torch.where(torch.isnan(m), prev, tau)
        view.layer_state[THRESHOLD_KEY] = tau
        return tau

    def _merge(self, view: LayerView, sources: torch.Tensor, targets: torch.Tensor, reset: bool):
        target, sim, has = most_similar(view, targets, sources)
        sources = sources & has[..., None]
        if not bool(sources.any()):
            return None
        tau = self.threshold(view, sources, sim, reset)
        sources = sources & (sim.to(torch.float64) >= tau[:, None, None])
        if not bool(sources.any()):
            return None
        return merge_kv(view, sources, target, sim, self.strategy)

    def select(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        prm = self.params
        return heavy_recent_select(
            view, scores, keep, start_size=prm.start_size, recent=prm.recent, recent_share=prm.recent_share, who="d2o"
        )

    def reduce(self, view: LayerView, scores: torch.Tensor, keep: torch.Tensor) -> Reduction:
        kept = self.select(view, scores, keep)
        evicted = view.valid & ~kept
        merged = self._merge(view, evicted, kept, reset=True) if bool(evicted.any()) else None
        return reduction_from_mask(view, kept, *(merged or (None, None)))

    def on_drop(
        self, view: LayerView, victims: torch.Tensor, victim_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.params.decode_merge:
            return None
        drop = victim_mask(view, victims, victim_valid)
        if not bool(drop.any()):
            return None
        return self._merge(view, drop, view.valid & ~drop, reset=False)


# ===================================================================================================== decode


class D2ODecodeParams(D2OWindow):
    """Parameters of the ``d2o`` decode scorer."""

    text_prior: bool = Field(default=False, description="drop image entries first (LOOK-M's rule; not in D2O)")
    per_head: bool = Field(default=True, description="accumulate and decide per kv head; false: mean over heads")


class D2ODecode(HeavyRecentDecode):
    """D2O while decoding (``d2o`` decode scorer).

    Wan et al., 2024, "D2O": at every step the cache is kept at the layer's budget as H2O does — the new token's
    attention row is added to each entry's accumulated score, and the lowest-scored entry outside the 4 sinks and
    the recent window (``floor(recent_share * budget)`` newest entries) is evicted; the ``d2o`` reducer's
    ``on_drop`` then merges it (or not) under the running threshold. The same class as the ``lookm`` decode scorer
    (:class:`kvpolicy.parts.HeavyRecentDecode`) with D2O's defaults: sinks, no text prior."""

    params_model = D2ODecodeParams


# ===================================================================================================== registration


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec(
            name="d2o",
            kind="allocator",
            params=D2OAllocatorParams,
            factory=D2OAllocator,
            summary="D2O: layer budgets L * budget * softmax(-density), same total (density per prompt when the prefill "
            "is shared, else given or uniform)",
            provides=frozenset(),
        ),
        *accumulated_specs(
            "d2o",
            encode_summary="D2O: attention accumulated from every prompt query, per kv head",
            decode_params=D2ODecodeParams,
            decode_factory=D2ODecode,
            decode_summary="D2O: accumulated attention, 4 sinks and the recent window never dropped",
        ),
        consumer_spec(
            name="d2o",
            kind="reducer",
            params=D2OParams,
            factory=D2OReducer,
            summary="D2O: sinks + recent + heavy hitters; evicted entries above an EMA similarity threshold merged "
            "into the most similar kept one",
        ),
    ]


#: the authors' README setting (hh_ratio = recent_ratio = 0.1, alpha = beta = 0.5), fixed budget while decoding
D2O_POLICY: dict[str, Any] = {
    "encode": {"name": "d2o"},
    "decode": {"name": "d2o"},
    "reducer": {"name": "d2o"},
    "allocator": {"name": "d2o"},
    "ratio": 0.8,
    "decode_budget": "fixed",
}


@hookimpl
def kvpolicy_presets() -> list[PresetSpec]:
    return [
        PresetSpec(
            name="d2o",
            summary="D2O: sinks + recent + heavy hitters, EMA-threshold similarity merge, 20% kept, fixed while "
            "decoding (layer densities per prompt on a shared prefill)",
            policy=D2O_POLICY,
        ),
    ]
