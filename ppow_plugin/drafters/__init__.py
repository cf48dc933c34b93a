"""Drafters: the EAGLE-3 implementation (`eagle3`), the adapters that give EAGLE-1 and EAGLE-3 one interface
for training and decoding (`adapters`), the on-disk formats (`formats`), where a drafter comes from (`drafter_source`:
a drafter directory, a run, a checkpoint) and the writers back to EAGLE / speculators (`export`).

May import: `ppow_plugin.host`, `ppow_plugin.method` and the top-level base modules.
"""


def __getattr__(name: str):
    """`ppow_plugin.drafters.<name>` for the names of the flat module `ppow_plugin/drafters.py` that became `adapters`."""
    import importlib
    import warnings

    module = importlib.import_module(f"{__name__}.adapters")
    attr = getattr(module, name, None)
    if name.startswith("__") or attr is None or isinstance(attr, type(importlib)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} has moved to {__name__}.adapters.{name}", DeprecationWarning, stacklevel=2)
    return attr
