"""ppow-plugin: PPOW reinforcement-learning stage for EAGLE drafters.

Importing the package pulls in nothing heavy (no torch.distributed, DeepSpeed or EAGLE).
docs/architecture.md maps the subpackages (host, method, drafters, data, evaluation, training) onto the
pipeline. The flat module names of versions before the layout (`ppow_plugin.trainer`, ...) still import,
with a DeprecationWarning naming the new home.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# old flat module -> its home since the layout of issue 29 (`data` and `drafters` are subpackages now:
# their __init__ forwards the old modules' names with a warning)
_MOVED = {
    "eagle_compat": "host.eagle_compat", "patching": "host.patching", "host_configs": "host.host_configs",
    "target_fields": "host.target_fields", "target_arch": "host.target_arch", "assets": "host.assets",
    "windowing": "method.windowing", "rewards": "method.rewards", "losses": "method.losses",
    "rollout": "method.rollout",
    "eagle3": "drafters.eagle3", "formats": "drafters.formats", "drafter_source": "drafters.drafter_source",
    "export": "drafters.export",
    "datasets": "data.datasets", "gen_data": "data.generate", "gen_features": "data.gen_features",
    "feature_cache": "data.feature_cache", "continuations": "data.continuations", "eval_prompts": "data.eval_prompts",
    "tree_decode": "evaluation.tree_decode", "simulate": "evaluation.simulate", "evaluate": "evaluation.evaluate",
    "eval_report": "evaluation.eval_report", "intervals": "evaluation.intervals", "profile": "evaluation.profile",
    "tau_probe": "evaluation.tau_probe",
    "trainer": "training.trainer", "rundir": "training.rundir", "plan": "training.plan",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `ppow_plugin.<old name>` to the module at its new home, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        if parent != __name__ or leaf not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} has moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module at its new home is already executed


def _forward_moved_names(package: str, module: str):
    """A module `__getattr__` for `package`, which took the place of a flat module whose names now live in
    `package.module`: an old name resolves there, with a DeprecationWarning."""

    def __getattr__(name: str):
        target = importlib.import_module(f"{package}.{module}")
        attr = getattr(target, name, None)
        if name.startswith("__") or attr is None or isinstance(attr, type(sys)):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(f"{package}.{name} has moved to {package}.{module}.{name}", DeprecationWarning, stacklevel=2)
        return attr

    return __getattr__


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
