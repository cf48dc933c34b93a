"""The host bridge: everything that touches EAGLE (the host) and the target model.

Owns: `eagle_compat` (the only module that imports `eagle`), `patching` (the version-pinned host patches),
`host_configs` (EAGLE's drafter config files), `target_fields` / `target_arch` (what a target's config says,
the packaged known configs) and `assets` (targets and data delivered as PyPI wheels).

May import: `ppow_plugin.errors`, `quiet`, `recipe_file`, `config`, `distributed`, `outputs`.
"""
