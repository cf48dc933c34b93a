"""Drafter adapters: everything the trainer does differently for EAGLE-1 and EAGLE-3 drafters.

    adapter = drafters.ADAPTERS[cfg.model.drafter_type]    # "eagle1" | "eagle3"

The trainer calls the same methods for both families (`build`, `target_pass`, `teacher_forced`,
`draft_windows`, `to_target_ids`, `restrict`, `sft_loss`, `export`; dense rollouts: `data_path`,
`to_draft_ids`), so `Trainer.train()` has no family `if`s. EAGLE-1 is the host's `cnets.Model` (features = the target's final hidden states, logits
through the target's frozen `lm_head`); EAGLE-3 is ours (`eagle3.py`: fused decoder-layer inputs
(2, L//2, L-3), its own `lm_head` over a draft vocabulary, `d2t`/`t2d` maps).

EAGLE-3 choices (docs/algorithm.md, "EAGLE-3 path"):
1. Draft tokens live in the draft vocabulary (rollout tokens, log-probs, the PPO ratio). They become
   target ids (`d2t`) before they are fed back to the drafter, verified or rewarded.
2. KL, distillation and ADAW compare the drafter's distribution with the target's restricted to the
   draft vocabulary and renormalised (softmax of the `t2d` logits), as EAGLE-3's own TTT labels do; the
   mass the target puts outside the draft vocabulary is ignored by these terms (verification still
   sees it: a draft can only be accepted if it is the target's choice over the full vocabulary).
3. The draft vocabulary of a fresh drafter is the `model.draft_vocab_size` most frequent loss-masked
   tokens of the first `model.draft_vocab_samples` training samples (EAGLE-3 counts its whole data set);
   warm starts keep their `d2t`/`t2d` exactly.
4. SFT is EAGLE-3's training-time test without feature noise (`sft.feature_noise` is EAGLE-1 only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppow_plugin.drafters import draft_vocab, eagle3, export, formats
from ppow_plugin.host import eagle_compat
from ppow_plugin.method import losses, rollout
from ppow_plugin.errors import UserError

StepStats = dict[str, float]


class DataPath(NamedTuple):
    """The drafter's unroll along the data from n starts (`*Adapter.data_path`, dense rollouts)."""

    logits: Tensor  # [n, K, Vd] fp32 with grad; [:, j] drafts x_{s+j+1}; over `cols` when set
    sft: Tensor | None  # the SFT loss on the same unroll (None when not asked)
    sft_stats: StepStats
    first: Tensor | None = None  # with `cols`: [n, Vd] depth 1 over the whole vocabulary (logits[:, 0] = first[:, cols])
    cols: Tensor | None = None  # [C] ascending ids: depths >= 2 computed over these only (`loss.deep_vocab_rows`)


def _target_embed(target: nn.Module) -> Tensor:
    return target.model.embed_tokens.weight.detach()


# ----------------------------------------------------------------------------------------------
# EAGLE-1 (the host's drafter)


class Eagle1Adapter:
    """The host EAGLE-1 drafter: next-feature prediction, logits through the target's lm_head."""

    name = "eagle1"
    sft_reads_target_logits = False  # its SFT loss recomputes them from the features (= final hidden states)

    def build(self, cfg, target: nn.Module, samples, dtype: torch.dtype) -> nn.Module:
        drafter = eagle_compat.new_eagle1_drafter(target.config, bias=cfg.model.drafter_bias,
                                                  embed_weight=_target_embed(target), dtype=dtype)
        if cfg.model.drafter is not None:
            # Strict read: every key and shape, and hidden/vocab sizes against this target.
            loaded = formats.load_drafter(cfg.model.drafter, target.config)
            if loaded.format != "eagle1":
                raise UserError(f"{cfg.model.drafter} holds an {loaded.format} drafter; set "
                                f"model.drafter_type={loaded.format} or pass an EAGLE-1 drafter dir")
            state = dict(loaded.state)
            # Compact dirs leave out the embeddings: they are the target's, frozen.
            state.setdefault(formats.EMBED_KEY, _target_embed(target))
            eagle_compat.load_drafter_weights(drafter, state)
        return drafter

    def target_pass(self, drafter, target, ids: Tensor, kv) -> rollout.TargetPass:
        return rollout.target_forward(target, ids[None], kv)

    def teacher_forced(self, drafter, target, features: Tensor, ids: Tensor,
                       rows: Tensor | None = None) -> tuple[rollout.DraftPass, Tensor]:
        """-> (DraftPass, draft logits [T-1, V] fp32; row i predicts x_{i+2}). With `rows` ([m] int64) the head
        runs on those rows only: logits [m, V] (the 49k-column head is the pass's cost)."""
        dpass = rollout.draft_forward(drafter, features, ids)
        return dpass, _head(target, dpass.out_features if rows is None else dpass.out_features[rows]).float()

    def draft_windows(self, drafter, target, dpass, starts, r, tokens=None, generator=None):
        return rollout.draft_windows(drafter, lambda h: _head(target, h), dpass, starts, r.group_size, r.window,
                                     r.temperature, tokens=tokens, generator=generator,
                                     greedy_members=r.greedy_members)

    def to_target_ids(self, drafter, draft_ids: Tensor) -> Tensor:
        return draft_ids

    def to_draft_ids(self, drafter, target_ids: Tensor) -> Tensor:
        return target_ids

    def restrict(self, drafter, target_logits: Tensor) -> Tensor:
        return target_logits

    def data_path(self, drafter, target, dpass, draft_logits, tpass, ids, valid, starts, depth, cfg, sft: bool,
                  soft_ce: Tensor | None = None, cols: Tensor | None = None, first_rows: Tensor | None = None):
        """The drafter's `depth`-step chain along the data from each start (`rollout.draft_windows` fed the data
        tokens, as `multi_step_loss`), and with `sft` the EAGLE-1 SFT loss on the same teacher-forced pass.
        With `cols` ([C] ascending ids holding every data token) the head at depths >= 2 computes only those
        columns (`loss.deep_vocab_rows`): the chain is fed column indices mapped back by a `d2t`-style offset.

        Args:
            dpass, draft_logits: the teacher-forced pass (with its graph); tpass: the target pass; ids [T];
            valid [T] bool; starts [n]; soft_ce: the caller's soft CE of `draft_logits` to the target on valid[1:]
            (`losses.distill_loss`, with graph), which is the SFT's token term: reused, not recomputed.
            first_rows: None (`draft_logits` holds every row [T-1, V]), or [n] the row of `draft_logits` holding each
            start's teacher-forced row s-1 (`draft_logits` then holds only some rows; `soft_ce` must be given).
            Returns: DataPath.
        """
        tokens = ids[(starts[:, None] + 1 + torch.arange(depth, device=ids.device)).clamp(max=ids.numel() - 1)]
        # depth 1 is the teacher-forced pass's row s-1: not recomputed
        full_first = _take_rows(draft_logits, starts - 1 if first_rows is None else first_rows)
        first, offset = [full_first], None
        if cols is not None:  # column indices in, target ids fed: index + offset[index] = cols[index]
            first, offset = [full_first[:, cols]], cols - torch.arange(cols.numel(), device=cols.device)
            tokens = torch.searchsorted(cols, tokens)

        def head(hidden: Tensor) -> Tensor:
            if first:
                return first.pop()
            return _head(target, hidden).float() if cols is None else _head_rows(target, hidden, cols)

        _, _, logits = rollout.draft_windows(drafter, head, dpass, starts, 1, depth, 1.0, tokens=tokens[:, None],
                                             d2t=offset, logprobs=False)
        logits = logits.squeeze(1)  # [n, K, V] (a view: no [n, 1, K, V] gradient buffer, unlike logits[:, 0])
        extra = {} if cols is None else {"first": full_first, "cols": cols}
        if not sft:
            return DataPath(logits, None, {}, **extra)
        rows = valid[1:]  # [T-1] row i predicts f_{i+1} and x_{i+2}
        feats = tpass.features[1:].to(dpass.out_features.dtype)
        if soft_ce is None:
            if first_rows is not None:
                raise ValueError("data_path with first_rows needs soft_ce (draft_logits holds only some rows)")
            soft_ce = losses.distill_loss(tpass.logits[1:], draft_logits, rows)[0]
        feature = losses.feature_regression(dpass.out_features, feats, rows)
        loss = cfg.sft.feature_weight * feature + cfg.sft.token_weight * soft_ce  # = losses.eagle1_sft_loss
        return DataPath(logits, loss, {"sft_feature_loss": float(feature.detach()),
                                       "sft_token_loss": float(soft_ce.detach())}, **extra)

    def sft_loss(self, drafter, target, item: dict, cfg, gen: torch.Generator) -> tuple[Tensor, StepStats]:
        """EAGLE-1 objective: next-feature SmoothL1 + soft CE to the target, on noised input features."""
        tpass, ids = item["tpass"], item["ids"]
        feats = tpass.features.to(_dtype(drafter))
        noise = (torch.rand(feats.shape, generator=gen) - 0.5).to(feats) * cfg.sft.feature_noise
        dpass = rollout.draft_forward(drafter, feats + noise, ids)
        rows = item["valid"][1:]  # [T-1]: only these rows count, so only they go through the 49k-row head
        pred = dpass.out_features[rows]  # [n, H], row i of out_features predicts f_{i+1}
        if item["sft_vocab"] is None:  # target logits = lm_head(final hidden), here only at the trained rows
            draft_logits, target_logits = _head(target, pred).float(), _head(target, tpass.features[1:][rows]).float()
        else:  # sft.vocab_rows: both distributions over the frequent tokens + this sequence's next tokens
            labels = torch.cat([ids[2:], ids.new_zeros(1)])[rows]  # [n] x_{i+2}, what row i is trained to draft
            cols = torch.unique(torch.cat([item["sft_vocab"], labels]))  # [N'] sorted target ids
            draft_logits = _head_rows(target, pred, cols)
            target_logits = _head_rows(target, tpass.features[1:][rows], cols)
        loss, st = losses.eagle1_sft_loss(pred[None], feats[1:][rows][None], draft_logits[None], target_logits[None],
                                          rows.new_ones((1, pred.shape[0])), cfg.sft.feature_weight,
                                          cfg.sft.token_weight)
        stats = {"feature_loss": float(st.feature_loss), "token_loss": float(st.token_loss),
                 "top1_acc": float(st.top1_acc)}
        if cfg.sft.multi_step > 0:
            deep, deep_acc = multi_step_loss(drafter, target, dpass, ids, item["valid"], tpass.features, cfg.sft,
                                             gen)
            loss = loss + cfg.sft.token_weight * deep
            stats.update(multi_step_loss=float(deep.detach()), multi_step_last_acc=deep_acc)
        return loss, {"loss": float(loss.detach()), **stats}

    def export(self, out: Path, state: dict[str, Tensor], drafter, target, cfg, meta: dict) -> Path:
        """Compact EAGLE-1 dir (no embeddings), the format training reads back."""
        config = eagle_compat.eagle1_config_dict(target.config, cfg.model.drafter_bias)
        return export.save_drafter_dir(out, state, config, meta)


def _take_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] ([m, ...] -> [n, ...]); x itself when index is 0..m-1 (every start at every valid row): no copy."""
    if index.numel() == x.shape[0] and bool((index == torch.arange(x.shape[0], device=index.device)).all()):
        return x
    return x[index]


def multi_step_loss(drafter, target, dpass: rollout.DraftPass, ids: Tensor, valid: Tensor, target_features: Tensor,
                    sft, gen: torch.Generator) -> tuple[Tensor, float]:
    """EAGLE-1 multi-step (HASS-style training-time test): from up to `sft.multi_step_starts` random trained
    roots s, re-draft the data continuation x_{s+1..s+1+m} feeding the drafter its *own* features (exactly
    `rollout.draft_windows`, i.e. what decoding does at depth > 1) and add the soft CE to the target at depths
    2..1+m, weighted sft.ttt_decay^depth-1 (depth 1 is the teacher-forced loss already).

    Args:
        dpass: the teacher-forced pass of this sequence (with its graph); ids [T]; valid [T] bool (valid[i]:
            x_{i+1} is trained); target_features [T, H] final hidden states, lm_head(row i) predicts x_{i+1}.
    Returns:
        (weighted mean soft CE, with grad; top-1 agreement at the deepest depth).
    """
    depth = sft.multi_step + 1
    t = ids.numel()
    ok = valid[1:t - depth].clone()  # roots s = 1..T-1-depth: the window x_{s+1..s+depth} exists
    ok &= valid[2:t - depth + 1]  # the first re-drafted position x_{s+2} is trained too
    cand = torch.nonzero(ok)[:, 0] + 1
    if cand.numel() == 0:
        return dpass.out_features.sum() * 0.0, 0.0
    starts = cand[torch.randperm(cand.numel(), generator=gen)[:sft.multi_step_starts].to(cand.device)].sort().values
    window = starts[:, None] + torch.arange(1, depth + 1, device=starts.device)  # [n, depth] positions s+1..s+depth
    _, _, logits = rollout.draft_windows(drafter, lambda h: _head(target, h), dpass, starts, 1, depth, 1.0,
                                         tokens=ids[window][:, None], logprobs=False)  # logits [n, 1, depth, V]
    total, weight, acc = 0.0, 0.0, 0.0
    for j in range(1, depth):  # logits[..., j] drafts x_{s+j+1}; the target's row s+j predicts it
        target_logits = _head(target, target_features[starts + j]).float()  # [n, V]
        ce, st = losses.distill_loss(target_logits, logits[:, 0, j], valid[starts + j])
        total, weight, acc = total + sft.ttt_decay ** j * ce, weight + sft.ttt_decay ** j, float(st.top1_acc)
    return total / weight, acc


def _head(target, features: Tensor) -> Tensor:
    return target.lm_head(features.to(target.lm_head.weight.dtype))


def _head_rows(target, features: Tensor, cols: Tensor) -> Tensor:
    """Target lm_head logits for the ids `cols` only: [n, H] -> [n, len(cols)] fp32."""
    weight, bias = target.lm_head.weight[cols], target.lm_head.bias  # [N', H]
    logits = features.to(weight.dtype) @ weight.T
    return (logits if bias is None else logits + bias[cols]).float()


# ----------------------------------------------------------------------------------------------
# EAGLE-3 (ppow's own drafter, eagle3.py)


class Eagle3Adapter:
    """The EAGLE-3 drafter: fused target features, own lm_head over the draft vocabulary, TTT SFT."""

    name = "eagle3"
    sft_reads_target_logits = True  # TTT labels: the target's logits at every trained position

    def build(self, cfg, target: nn.Module, samples, dtype: torch.dtype) -> nn.Module:
        if cfg.model.drafter is not None:
            drafter = load_eagle3_drafter(cfg.model.drafter, target, dtype)
            want = cfg.model.draft_vocab_size
            if want is not None and want != drafter.cfg.draft_vocab_size:
                raise UserError(f"model.draft_vocab_size={want} but the warm-start drafter {cfg.model.drafter} has "
                                f"{drafter.cfg.draft_vocab_size}; its vocabulary is kept: unset model.draft_vocab_size")
            return drafter
        drafter = new_eagle3(target, cfg.model.draft_vocab_size, dtype)
        if drafter.cfg.draft_vocab_size < drafter.cfg.vocab_size:
            counts = count_loss_tokens(samples, cfg.model.draft_vocab_samples, drafter.cfg.vocab_size)
            drafter.set_vocab_map(*draft_vocab.build_vocab_map(counts, drafter.cfg.draft_vocab_size))
        return drafter

    def target_pass(self, drafter, target, ids: Tensor, kv) -> rollout.TargetPass:
        return rollout.target_forward(target, ids[None], kv, feature_layers=drafter.cfg.feature_layer_ids)

    def teacher_forced(self, drafter, target, features: Tensor, ids: Tensor,
                       rows: Tensor | None = None) -> tuple[rollout.DraftPass, Tensor]:
        """Pairs (f_i, x_{i+1}), i = 0..T-2 -> (DraftPass, draft logits [T-1, Vd] fp32; row i predicts x_{i+2});
        with `rows` ([m] int64) only those rows' logits [m, Vd] (the drafter's forward computes them all)."""
        out, logits, kv = drafter(features[None, :-1].to(_dtype(drafter)), ids[None, 1:])
        return rollout.DraftPass(out_features=out[0], kv=kv), (logits[0] if rows is None else logits[0, rows]).float()

    def draft_windows(self, drafter, target, dpass, starts, r, tokens=None, generator=None):
        def head(hidden: Tensor) -> Tensor:  # what forward() applies to its output
            return drafter.lm_head(drafter.norm(hidden))

        return rollout.draft_windows(drafter, head, dpass, starts, r.group_size, r.window, r.temperature,
                                     tokens=tokens, generator=generator, step=eagle3_step, d2t=drafter.d2t,
                                     greedy_members=r.greedy_members, prefix_cache=rollout.expand_cache)

    def to_target_ids(self, drafter, draft_ids: Tensor) -> Tensor:
        return draft_vocab.draft_to_target_ids(draft_ids, drafter.d2t)

    def to_draft_ids(self, drafter, target_ids: Tensor) -> Tensor:
        """Target ids -> draft ids, -1 for ids outside the draft vocabulary (draft ids are ascending target ids)."""
        index = drafter.t2d.long().cumsum(0) - 1  # [V]
        return torch.where(drafter.t2d[target_ids], index[target_ids], -1)

    def data_path(self, drafter, target, dpass, draft_logits, tpass, ids, valid, starts, depth, cfg, sft: bool,
                  soft_ce: Tensor | None = None, cols: Tensor | None = None, first_rows: Tensor | None = None):
        """The training-time-test unroll along the data (`eagle3.ttt_unroll`, via `ttt_batch`): step j, row s-1 is
        depth j+1 of the window from s; with `sft` the TTT loss of its first `sft.ttt_steps` steps.

        Args: as `Eagle1Adapter.data_path` (dpass, draft_logits, soft_ce, cols, first_rows are not read: `Config` keeps
        `loss.deep_vocab_rows` to EAGLE-1, whose head is the target's). Returns: DataPath.
        """
        steps = max(depth, cfg.sft.ttt_steps) if sft else depth
        step_logits, probs, masks = ttt_batch(drafter, tpass, ids, valid, steps)
        logits = torch.stack([step_logits[j][0, starts - 1] for j in range(depth)], 1).float()  # [n, K, Vd]
        if not sft:
            return DataPath(logits, None, {})
        n = cfg.sft.ttt_steps
        loss, st = losses.ttt_sft_loss(step_logits[:n], probs[:n], masks[:n], cfg.sft.ttt_decay)
        return DataPath(logits, loss, {"sft_token_loss": float(st.per_step_loss[0]),
                                       "sft_ttt_last_acc": float(st.per_step_acc[-1])})

    def restrict(self, drafter, target_logits: Tensor) -> Tensor:
        """Target logits over the draft vocabulary ([..., V] -> [..., Vd]); softmax renormalises them."""
        return target_logits[..., drafter.t2d]

    def sft_loss(self, drafter, target, item: dict, cfg, gen: torch.Generator) -> tuple[Tensor, StepStats]:
        tpass, ids, valid = item["tpass"], item["ids"], item["valid"]
        step_logits, probs, masks = ttt_batch(drafter, tpass, ids, valid, cfg.sft.ttt_steps)
        loss, st = losses.ttt_sft_loss(step_logits, probs, masks, cfg.sft.ttt_decay)
        return loss, {"loss": float(loss.detach()), "token_loss": float(st.per_step_loss[0]),
                      "top1_acc": float(st.per_step_acc[0]), "ttt_last_acc": float(st.per_step_acc[-1])}

    def export(self, out: Path, state: dict[str, Tensor], drafter, target, cfg, meta: dict) -> Path:
        """`eagle3` dir: LlamaForCausalLMEagle3 config.json + model.safetensors with exactly the EAGLE-3 keys."""
        return export.save_eagle3_dir(out, state, drafter.cfg.to_hf_dict(), meta)


def eagle3_step(drafter, feat: Tensor, tok: Tensor, kv: tuple, position_ids: Tensor,
                attention_mask: Tensor) -> tuple[Tensor, tuple]:
    """`rollout.eagle1_step` for the EAGLE-3 drafter (tok = target ids; mask [N, S+1] -> [N, 1, S+1])."""
    out, _, kv = drafter(feat, tok[:, None], past_kv=kv, position_ids=position_ids,
                         attention_mask=attention_mask[:, None])
    return out, kv


def ttt_batch(drafter, tpass: rollout.TargetPass, ids: Tensor, valid: Tensor, steps: int):
    """Training-time-test logits, soft labels and masks for one sequence (`losses.ttt_sft_loss` inputs).

    Step k, row i drafts x_{i+2+k} (eagle3.ttt_unroll); its label is the target distribution at position
    i+1+k restricted to the draft vocabulary; it counts where x_{i+2+k} is assistant text (`valid[i+1+k]`),
    the target's argmax is in the draft vocabulary, and i+1+k < T.

    Args:
        tpass: EAGLE-3 target pass (features [T, 3H_t], logits [T, V]).
        ids: [T] int64; valid: [T] bool, valid[j] = x_{j+1} is a training position.
    Returns:
        per step: draft logits [1, T, Vd], target probs [1, T, Vd], masks [1, T] bool.
    """
    t = ids.numel()
    next_ids = torch.cat([ids[1:], ids.new_zeros(1)])[None]  # [1, T], next_ids[i] = x_{i+1}
    step_logits = eagle3.ttt_unroll(drafter, tpass.features[None].to(_dtype(drafter)), next_ids, steps)
    probs, masks = [], []
    for k in range(steps):
        tl = tpass.logits[1 + k:]  # [T-1-k, V]: row i predicts x_{i+2+k}
        pad = t - tl.shape[0]
        probs.append(F.pad(draft_vocab.map_target_probs_to_draft(tl, drafter.t2d), (0, 0, 0, pad))[None])
        masks.append(F.pad(valid[1 + k:] & draft_vocab.draft_label_mask(tl, drafter.t2d), (0, pad))[None])
    return step_logits, probs, masks


def count_loss_tokens(samples, num_samples: int, vocab_size: int) -> Tensor:
    """[V] int64 counts of the loss-masked (assistant) tokens in the first `num_samples` samples."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(num_samples, len(samples))):
        s = samples[i]
        ids = torch.as_tensor(s.input_ids, dtype=torch.long)
        counts += torch.bincount(ids[torch.as_tensor(s.loss_mask, dtype=torch.bool)], minlength=vocab_size)
    return counts


def new_eagle3(target: nn.Module, draft_vocab_size: int | None, dtype: torch.dtype) -> eagle3.Eagle3Drafter:
    """A random-init EAGLE-3 drafter for `target` (identity vocabulary map until `set_vocab_map`)."""
    try:
        return eagle3.new_eagle3_drafter(target, draft_vocab_size, dtype)
    except ValueError as exc:
        raise UserError(f"cannot build an EAGLE-3 drafter for this target: {exc}") from None


def load_eagle3_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype = torch.float32
                        ) -> eagle3.Eagle3Drafter:
    """An EAGLE-3 drafter dir (ours or a published one) read through `formats.load_drafter`, d2t/t2d exact.

    Raises:
        UserError: not an EAGLE-3 drafter, or sizes that do not fit `target`.
    """
    loaded = formats.load_drafter(path, target.config)
    if loaded.format != "eagle3":
        raise UserError(f"{path} holds an {loaded.format} drafter; model.drafter_type=eagle3 needs an EAGLE-3 dir")
    drafter = new_eagle3(target, loaded.dims.draft_vocab, dtype)
    state = dict(loaded.state)
    state.setdefault(formats.EMBED_KEY, _target_embed(target))  # optional in the format: the target's
    try:
        drafter.load_state_dict({k: v.to(drafter.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"{path} does not fit an EAGLE-3 drafter for this target: {str(exc).splitlines()[0]}") from None
    return drafter


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


ADAPTERS: dict[str, Any] = {"eagle1": Eagle1Adapter(), "eagle3": Eagle3Adapter()}
