"""The PPOW method as pure tensor code: window selection (ADAW), rewards, group advantages and losses, and
the rollout (draft windows, verify them, the accepted length k).

Nothing here loads files, picks a device or logs; every function takes tensors and returns tensors or
named containers.

May import: `ppow_plugin.errors`, `config` and the layers below it (in practice: nothing but torch).
"""
