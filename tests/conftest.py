"""Shared test setup: offline, deterministic, CPU only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()  # the host's "no GenerationMixin" notice is expected noise
