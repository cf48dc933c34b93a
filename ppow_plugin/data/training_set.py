"""The training set a recipe asks for, and the seeded, resumable, per-rank stream the trainer reads.

Usage:
    samples, report = build_training_samples(cfg.data, target_dir)   # report: what was dropped and why
    data = TrainingData(samples, seed=0, rank=rank, world_size=ws)
    sample = data.next()   # TokenizedSample(conversation_id, input_ids [T], loss_mask [T])

Sources: ShareGPT or a JSONL of conversations (tokenized with the target's chat template, `samples`), or
the target's own generated answers (`generate`, token ids already).
"""

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from ppow_plugin.data.datasets import load_sharegpt, parse_jsonl_conversations, split_of
from ppow_plugin.data.generate import default_output_dir
from ppow_plugin.data.shards import load_generated
from ppow_plugin.data.samples import DataReport, TokenizedConversations, TokenizedSample, _scan_cached
from ppow_plugin.errors import UserError


def build_training_samples(data_cfg, target_dir: str | Path, progress: bool = False
                           ) -> tuple[TokenizedConversations, DataReport]:
    """The training set a config asks for, scanned once, then tokenized lazily with the target's chat template.

    Args:
        data_cfg: `config.DataCfg` (dataset, max_len, num_conversations, heldout_fraction); dataset=generated
            reads `shards.load_generated(data_cfg.path)`.
        target_dir: a converted target directory (its tokenizer and chat template are used).
        progress: show a progress bar for the scan (~13 ms per ShareGPT conversation on 2 CPU cores).
    Returns:
        (samples with a non-empty loss mask, the DataReport of what was dropped).
    """
    from transformers import AutoTokenizer

    if data_cfg.dataset == "generated":  # `ppow data generate` output: token ids, no chat template needed
        path = data_cfg.path or default_output_dir(target_dir, data_cfg.heldout_fraction)
        return load_generated(path, data_cfg.max_len, data_cfg.heldout_fraction, data_cfg.num_conversations)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {target_dir} has no chat template; training needs one")
    if data_cfg.dataset == "sharegpt":
        convs, parse_stats = load_sharegpt(), Counter()
    else:
        convs, parse_stats = parse_jsonl_conversations(data_cfg.path)
    train = [c for c in convs if split_of(c.id, data_cfg.heldout_fraction) == "train"]
    if not train:
        raise UserError(f"no training conversations left in data.dataset={data_cfg.dataset} after the "
                        f"held-out split; add data or lower data.heldout_fraction")
    used, report = _scan_cached(train[: data_cfg.num_conversations], tokenizer, Path(target_dir), data_cfg.max_len,
                                progress)
    dropped = {k: v for k, v in sorted(parse_stats.items()) if k != "kept"}
    return TokenizedConversations(used, tokenizer, data_cfg.max_len), report._replace(parse_dropped=dropped)


class TrainingData:
    """Training samples in a seeded, resumable, per-rank order; `next()` never runs out.

    Epoch e is a permutation of all samples drawn from `random.Random(f"{seed}:{e}")`; rank r takes
    every `world_size`-th entry starting at r, cut so every rank has the same count. Samples whose
    loss mask is empty (e.g. a first user turn longer than max_len) are skipped and counted in
    `num_empty`.

    `state_dict()` is the position of the *next* sample on this rank. Skipped samples make ranks
    drift apart, so save and restore the state per rank.
    """

    def __init__(self, samples: Sequence[TokenizedSample], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        if len(samples) < world_size:
            raise UserError(f"{len(samples)} training samples cannot be shared by {world_size} ranks")
        self.samples, self.seed, self.rank, self.world_size = samples, seed, rank, world_size
        self.epoch, self.position, self.num_empty = 0, 0, 0
        self._order = self.epoch_order(0)

    def __len__(self) -> int:
        """Samples per rank per epoch (including any that will be skipped as empty)."""
        return len(self.samples) // self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `samples` that this rank visits in `epoch`."""
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][: len(self)]

    def next(self) -> TokenizedSample:
        """The next sample with a non-empty loss mask (moving on to the next epoch as needed)."""
        for _ in range(2 * len(self)):  # covers at least one whole epoch
            if self.position >= len(self):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self.epoch_order(self.epoch)
            sample = self.samples[self._order[self.position]]
            self.position += 1
            if sample.loss_mask.any():
                return sample
            self.num_empty += 1
        raise UserError(f"no training sample on rank {self.rank} has assistant tokens; "
                        "raise data.max_len or check the data")

    def __iter__(self) -> Iterator[TokenizedSample]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "num_samples"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise UserError(f"data state was saved with {key}={state[key]}, now {mine}; "
                                "resume with the same data, seed and number of ranks")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self.epoch_order(self.epoch)
