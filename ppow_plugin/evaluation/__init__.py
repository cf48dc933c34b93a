"""Evaluation: the target and drafter an evaluation reads, checked to fit (`inputs`), tree decoding on the
host target (`tree_decode`, drafting in `tree_draft`), real decoding and tau (`evaluate`), the
exact simulation of decoding from cached continuations (`simulate`; dynamic trees only where the cycle walk
reads them, `tree_walk`), per-prompt records and reports
(`eval_report`), paired bootstrap intervals (`intervals`), drafter cost gamma (`profile`) and the in-training
tau probe (`tau_probe`).

May import: `ppow_plugin.data`, `ppow_plugin.drafters`, `ppow_plugin.method`, `ppow_plugin.host` and the
top-level base modules.
"""
