"""Target features captured while the target generates: feature-cache entries for generated data at no
extra target pass (`ppow data generate --features eagle1,eagle3`).

    with FeatureTap(model, layer_ids=(2, 15, 27)) as tap:   # forward hooks on the HF target
        out = model.generate(...)
        tap.finish(out, attention_mask, past_key_values)     # one more step: the last token's own features
    final, layers = tap.stacked()                            # [B, S, H], [B, S, 3H] over the padded batch

Generating already runs the target over every prompt and response token; the cached-SFT path would run
it once more per sequence to fill the feature cache (`feature_cache.FeatureCache`), and that pass costs
as much as the generation itself (same tokens, same layers). Recording the hidden states the generation
computes halves the target compute per training sequence. What is recorded is what
`rollout.target_forward` returns: the final-norm hidden state (EAGLE-1 features, EAGLE-3 `hidden`) and
the inputs of the EAGLE-3 feature layers (HF `hidden_states` indices). They come from the left-padded
batched pass, which differs from a one-sequence pass only by float rounding (far below the fp16 the cache
stores; tests/test_gen_data.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ppow_plugin.data import continuations


class FeatureTap:
    """Forward hooks on an HF causal LM recording, per forward call, the final-norm output and the inputs
    of the chosen decoder layers (all [B, t, H])."""

    def __init__(self, model, layer_ids: Sequence[int] | None):
        self.model, self.layer_ids = model, tuple(layer_ids or ())
        self.final: list[Tensor] = []
        self.layers: dict[int, list[Tensor]] = {i: [] for i in self.layer_ids}
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        body = self.model.model
        self._handles.append(body.norm.register_forward_hook(lambda _m, _a, out: self.final.append(out.detach())))
        for i in sorted(set(self.layer_ids)):  # (2, 3, 3) for tiny targets: one hook per layer
            def pre(_m, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                self.layers[i].append(h.detach())
            self._handles.append(body.layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def finish(self, sequences: Tensor, attention_mask: Tensor, past_key_values) -> None:
        """Run the target on the last generated token so that every token has its features.

        `generate` never feeds its final token back; one cached step does. sequences: [B, P+N] (what
        `generate` returned), attention_mask: [B, P] the prompts' mask; past_key_values: its cache.
        """
        n_new = sequences.shape[1] - attention_mask.shape[1]
        mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], n_new))], dim=1)
        position = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)  # [B, 1], as generate numbers positions
        with torch.no_grad():
            continuations.cached_step(self.model, past_key_values, input_ids=sequences[:, -1:],
                                      attention_mask=mask, position_ids=position)

    def stacked(self) -> tuple[Tensor, Tensor | None]:
        """-> (final-norm hidden states [B, S, H], EAGLE-3 features [B, S, 3H] or None), S = every position
        the model was run on, in order (prompt width + generated tokens)."""
        final = torch.cat(self.final, dim=1)
        if not self.layer_ids:
            return final, None
        return final, torch.cat([torch.cat(self.layers[i], dim=1) for i in self.layer_ids], dim=-1)


def row_features(full: Tensor, width: int, prompt_len: int, length: int) -> Tensor:
    """One sequence's features out of a left-padded batch.

    Args:
        full: [S, F] features of one batch row over every position the model ran on.
        width: the padded prompt width P; prompt_len: this row's real prompt tokens; length: prompt + response.
    Returns:
        [length, F]: position j of the sequence (prompt tokens first, then its response).
    """
    start = width - prompt_len
    if start + length > full.shape[0]:
        raise ValueError(f"row needs {start + length} positions, the batch ran {full.shape[0]}")
    return full[start:start + length]


class FeatureSinks(NamedTuple):
    """The feature caches a generation run fills, and what to record for them."""

    caches: tuple  # FeatureCache per requested drafter family
    layer_ids: tuple[int, ...] | None  # EAGLE-3 feature layers (None: no EAGLE-3 cache requested)
    max_len: int  # data.max_len of the training runs that will read the entries (part of the cache key)


def open_sinks(target_dir, kinds: Sequence[str], num_layers: int, max_len: int, place) -> FeatureSinks | None:
    """Feature caches for `kinds` ("eagle1", "eagle3") of the target generating in `place`
    (`devices.Placement`), keyed exactly as `ppow sft` opens them."""
    from ppow_plugin.data import feature_cache
    from ppow_plugin.drafters import eagle3  # feature_cache imports gen_data: import here
    if not kinds:
        return None
    layers = eagle3.feature_layer_ids(num_layers) if "eagle3" in kinds else None
    caches = tuple(feature_cache.FeatureCache.open(target_dir, k, layers if k == "eagle3" else None, max_len, place)
                   for k in kinds)
    return FeatureSinks(caches, layers, max_len)


def store(sinks: FeatureSinks, ids: Sequence[int], prompt_len: int, final: Tensor, layers: Tensor | None) -> None:
    """Write one generated sequence's entry into every sink, at the address of the sample training reads
    (`samples.response_sample`).

    final: [T, H] final-norm hidden states; layers: [T, 3H] EAGLE-3 features or None; T = len(ids)."""
    from ppow_plugin.data.samples import response_sample
    from ppow_plugin.method.rollout import TargetPass
    sample = response_sample("", ids, prompt_len, sinks.max_len)
    if not sample.loss_mask.any():  # no response token within max_len: training drops this sequence
        return
    t = len(sample.input_ids)
    for cache in sinks.caches:
        feats = layers if cache.eagle3 else final
        cache.put(sample, TargetPass(features=feats[:t], logits=None, hidden=final[:t]))
