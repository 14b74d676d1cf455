"""Per-head scores: how much each kv head of a model needs its whole context, measured or read from a file.

Policies that treat kv heads differently by what they are for (DuoAttention's retrieval vs streaming heads, and any
head-wise budget) need one number per decoder layer and kv head. This package produces and keeps them, without
naming any policy:

* :mod:`.table` — the table and its file format (the DuoAttention authors' ``full_attention_heads.tsv`` layout);
* :mod:`.settings` — what a calibration runs with (:class:`HeadCalibration`), the key its scores are cached under;
* :mod:`.store` — where calibrated scores live (``<cache_root()>/head_scores/<model identity>/<key>.tsv``) and the
  model identity (architecture + weight bytes), so a part can find them from the model object alone;
* :mod:`.ablation` — the attention function that streams chosen heads for the measurement;
* :mod:`.calibrate` — the measurement itself (:func:`calibrate_heads`, ``kvpolicy calibrate-heads``).

Import the submodules directly: this package's ``__init__`` imports nothing, so a part that only reads a table never
loads the model-running code.
"""
