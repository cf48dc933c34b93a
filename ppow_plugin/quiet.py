"""Known-harmless third-party output, hidden at the `ppow` entry point; `--verbose` shows everything.

Only `cli.main` calls `hide_third_party_noise()`, so library code and the tests see every warning. Each
entry below names the message and why it is harmless here. Our own warnings, errors and progress bars
are never filtered: our bars pass `disable=` explicitly, which `TQDM_DISABLE` does not override.
"""

from __future__ import annotations

import logging
import os
import warnings

# (logger that emits it, text in the message, why it is harmless here)
LOG_NOISE = (
    ("transformers.modeling_utils", "has generative capabilities, as `prepare_inputs_for_generation`",
     "the EAGLE host's KV-cache Llama defines prepare_inputs_for_generation; nothing calls generate() on it"),
    ("transformers.configuration_utils", "`use_return_dict` is deprecated",
     "read by the pinned EAGLE host; the transformers version is pinned with it"),
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated",
     "the host's KV cache is passed under the old name; same pin"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "printed on every CPU import of DeepSpeed; dist.device chooses the device, not DeepSpeed"),
)
# (warning category, regex matched against the start of the message, why it is harmless here)
WARNING_NOISE = (
    (FutureWarning, r"`rope_scaling` is deprecated",
     "transformers reading the host's Llama config; the values are used unchanged"),
)


class _DropContaining(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def hide_third_party_noise(progress_bars: bool = False) -> None:
    """Install the filters above for this process (call before torch/transformers/deepspeed load).

    Args:
        progress_bars: keep third-party progress bars (weight loading, shard merging); `ppow prepare`
            keeps them because its conversion takes minutes.
    """
    for name, text, _ in LOG_NOISE:
        logging.getLogger(name).addFilter(_DropContaining(text))  # filters of the emitting logger always run
    for category, pattern, _ in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    if not progress_bars:
        os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported
