"""Drafters: the EAGLE-3 implementation (`eagle3`, its reduced vocabulary `draft_vocab`), the adapters that give EAGLE-1 and EAGLE-3 one interface
for training and decoding (`adapters`), the on-disk formats (`formats`), where a drafter comes from (`drafter_source`:
a drafter directory, a run, a checkpoint) and the writers back to EAGLE / speculators (`export`).

May import: `ppow_plugin.host`, `ppow_plugin.method` and the top-level base modules.
"""


from ppow_plugin import _forward_moved_names

__getattr__ = _forward_moved_names(__name__, "adapters")  # the names of the flat `drafters.py` of earlier versions
