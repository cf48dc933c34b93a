"""Write a tuning prompt set that no evaluation and no committed training run has seen.

    .venv/bin/python scripts/dev_prompts.py runs/dev-prompts.jsonl [N]

Issue 15 chooses PPOW settings by the simulated τ of short runs; the evaluation prompts (MT-Bench,
HumanEval, the 200 held-out ShareGPT prompts) must not be looked at for that, and the τ probe during
training reads the held-out ShareGPT slice. This takes the *last* N (default 48) first user turns of
training-split ShareGPT conversations in file order that the committed generated data did not answer:
the SFT starts trained only on the generated answers (and a warm start on the first 1000 train-split
conversations), and PPOW runs read the train split from its start, far from its end.
"""

import json
import sys
from pathlib import Path

from ppow_plugin.data import datasets, shards

GENERATED = Path("assets/generated/smollm2-135m-sharegpt-2048")


def main() -> None:
    out = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    used = {str(c) for shard in shards.read_shards(GENERATED) for c in shard.conversation_ids}
    convs = [c for c in datasets.load_sharegpt() if datasets.split_of(c.id) == "train"]
    picked = []
    for conv in reversed(convs[2048 * 4:]):  # well past anything a recipe reads in file order
        first = next((m.content for m in conv.messages if m.role == "user"), "")
        if conv.id in used or not first.strip() or len(first) > 2000:
            continue
        picked.append({"id": conv.id, "prompt": first})
        if len(picked) == n:
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p) + "\n" for p in reversed(picked)))
    print(f"wrote {len(picked)} prompts to {out} (none of {len(used)} generated-data conversations)")


if __name__ == "__main__":
    main()
