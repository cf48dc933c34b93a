"""EAGLE-3 dynamic-tree decoding: tree layout by hand, target-preserving sampling rule, and LOSSLESS greedy
decoding vs HF `generate` on tiny random Llama targets (+ one slow test on the real SmolLM2 target)."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.drafters.draft_vocab import build_vocab_map
from ppow_plugin.drafters.eagle3 import Eagle3Drafter, new_eagle3_drafter
from ppow_plugin.evaluation.tree_decode import DraftTree, build_tree, generate_eagle3, greedy_accept, sample_accept

needs_host = pytest.mark.skipif(patching.patch_status().state in ("missing", "wrong-version"),
                                reason="eagle-llm 1.2.1 is not installed")
VOCAB = 256
EOS = 1


# ----------------------------------------------------------------------------------------------
# Pure tree layout and acceptance


def _hand_tree() -> DraftTree:
    """Candidates: root children a(0) b(1); a's children c(2) d(3); b's child e(4); c's child f(5).
    With total_tokens=4 the best scores keep a(-0.1), c(-0.2), f(-0.3), b(-0.5); d and e are dropped."""
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    parent = torch.tensor([-1, -1, 0, 0, 1, 2])
    score = torch.tensor([-0.1, -0.5, -0.2, -1.5, -2.0, -0.3])
    depth = torch.tensor([1, 1, 2, 2, 2, 3])
    return build_tree(7, tokens, parent, score, depth, total_tokens=4)


def test_build_tree_keeps_best_nodes_with_parents_first():
    tree = _hand_tree()
    # best 4 by score: a(-0.1), c(-0.2), f(-0.3), b(-0.5); laid out by depth: a, b | c | f
    assert tree.tokens.tolist() == [7, 10, 11, 12, 15]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 3]
    assert tree.depth.tolist() == [0, 1, 1, 2, 3]
    expected_mask = torch.tensor([[1, 0, 0, 0, 0],
                                  [1, 1, 0, 0, 0],
                                  [1, 0, 1, 0, 0],
                                  [1, 1, 0, 1, 0],
                                  [1, 1, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(tree.tree_mask, expected_mask)
    assert tree.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 3, 4]]


def test_build_tree_ties_keep_parents():
    # a probability-1 chain: every cumulative score is 0; depth breaks the tie so parents are kept first
    tree = build_tree(0, torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1]), torch.zeros(3),
                      torch.tensor([1, 2, 3]), total_tokens=2)
    assert tree.tokens.tolist() == [0, 5, 6] and tree.parent.tolist() == [-1, 0, 1]


def test_build_tree_masks_and_paths_on_random_trees():
    """On random candidate sets (as `draft_candidates` makes them: k per level under the k best of the level
    above, ties included), every mask row is the node's ancestors and itself, and `retrieve` lists each leaf's
    root→leaf path in node order, leaves ascending. Checked against the parent chain, written out here."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        k, levels, total = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 5), (0, 5), (1, 30)))
        score = -torch.randint(0, 3, (k,), generator=gen).float()                  # ties on purpose
        parent, depth, front = [-1] * k, [1] * k, list(range(k))
        for lvl in range(levels):
            base = len(parent)
            parent += [f for f in front for _ in range(k)]
            depth += [lvl + 2] * (k * len(front))
            step = torch.randint(0, 2, (k * len(front),), generator=gen).float()
            score = torch.cat([score, score[torch.tensor(parent[base:])] - step])
            front = (base + (-score[base:]).sort(stable=True).indices[:k]).tolist()
        tokens = torch.randint(0, 50, (len(parent),), generator=gen)
        tree = build_tree(99, tokens, torch.tensor(parent), score, torch.tensor(depth), total)
        n = tree.tokens.numel()
        paths = []
        for i in range(n):
            chain, j = [], i
            while j >= 0:
                chain.append(j)
                j = int(tree.parent[j])
            assert tree.tree_mask[i].nonzero()[:, 0].tolist() == sorted(chain)
            paths.append(chain[::-1])
        leaves = [i for i in range(n) if i not in tree.parent.tolist()]
        width = int(tree.depth.max()) + 1
        assert tree.retrieve.tolist() == [paths[i] + [-1] * (width - len(paths[i])) for i in leaves]


@needs_host
def test_greedy_accept_follows_target_argmax():
    tree = _hand_tree()
    logits = torch.full((5, 20), -5.0)
    logits[0, 10] = 5.0   # root -> a (node 1)
    logits[1, 12] = 5.0   # a -> c (node 3)
    logits[3, 3] = 5.0    # c -> 3, but the drafted child is f(15): rejected
    path, a, next_logits = greedy_accept(tree, logits)
    assert path.tolist() == [0, 1, 3] and a == 2 and int(next_logits.argmax()) == 3
    logits[0] = -5.0
    logits[0, 4] = 5.0    # root's argmax is no drafted child: nothing accepted
    path, a, next_logits = greedy_accept(tree, logits)
    assert path.tolist() == [0] and a == 0 and int(next_logits.argmax()) == 4


def test_sample_accept_preserves_the_target_distribution():
    # root children (tokens 10, 11, after the hand tree); the first emitted token must follow p exactly
    tree = _hand_tree()
    p = torch.zeros(20)
    p[10], p[11], p[3] = 0.2, 0.3, 0.5
    logits = torch.log(p.clamp_min(1e-30)).expand(5, 20).clone()
    gen = torch.Generator().manual_seed(0)
    n, counts = 3000, torch.zeros(20)
    for _ in range(n):
        path, a, nxt = sample_accept(tree, logits, temperature=1.0, generator=gen)
        first = int(tree.tokens[path[1]]) if a > 0 else nxt
        counts[first] += 1
        assert len(path) == a + 1
    torch.testing.assert_close(counts / n, p, atol=0.03, rtol=0)


# ----------------------------------------------------------------------------------------------
# Lossless greedy decoding on tiny random targets


def _make_target(out_dir: Path, residual_scale: float, tie: bool, seed: int) -> LlamaForCausalLM:
    """A 6-layer random Llama (rope_theta 1e5); residual_scale < 1 makes it close to a bigram model."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=1e5, bos_token_id=0, eos_token_id=EOS, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory):
    """(hf, host) pairs: a near-bigram untied target and a generic tied one."""
    out = {}
    for name, scale, tie, seed in (("bigram", 0.1, False, 0), ("tied", 1.0, True, 1)):
        d = tmp_path_factory.mktemp(name)
        hf = _make_target(d, scale, tie, seed)
        out[name] = (hf, eagle_compat.load_host_target(d))
    return out


class _OracleBigramDrafter(Eagle3Drafter):
    """Random-init EAGLE-3 drafter whose logits are replaced by a table lookup on the input token: the
    target's one-token next-token logits. On a near-bigram target this drafts long accepted chains (deep
    acceptance, off-first-branch acceptance), exercising KV compaction and the drafter cache."""

    def forward(self, hidden, input_ids, past_kv=None, position_ids=None, attention_mask=None):
        out, _, kv = super().forward(hidden, input_ids, past_kv, position_ids, attention_mask)
        return out, self.table[input_ids], kv


def _oracle(hf: LlamaForCausalLM, host, draft_vocab: int | None, t2d: torch.Tensor | None) -> Eagle3Drafter:
    drafter = new_eagle3_drafter(host, draft_vocab)
    oracle = _OracleBigramDrafter(drafter.cfg, embed_weight=drafter.embed_tokens.weight).eval()
    oracle.load_state_dict(drafter.state_dict())
    with torch.no_grad():
        table = hf(torch.arange(VOCAB)[:, None]).logits[:, 0]  # [V, V]
    if t2d is not None:
        d2t, _ = build_vocab_map(t2d.float(), int(t2d.sum()))
        oracle.set_vocab_map(d2t, t2d)
        table = table[:, t2d]
    oracle.table = 3.0 * table  # sharpen: deeper trees
    return oracle


def _hf_greedy(hf: LlamaForCausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=EOS)
    return out[0, prompt.shape[1]:].tolist()


def _check(result, prompt, reference, n, depth):
    generated = result.output_ids[0, prompt.shape[1]:].tolist()
    assert len(reference) == n or reference[-1] == EOS  # HF stops at the config's EOS, we do not
    assert generated[:len(reference)] == reference
    assert len(generated) == result.new_tokens >= n
    assert len(result.accept_lengths) == result.cycles
    assert sum(result.accept_lengths) + result.cycles == result.new_tokens
    assert all(0 <= a <= depth + 1 for a in result.accept_lengths)


PROMPTS = [[0, 17, 99, 4], [0, 200, 3, 3, 150, 42, 7, 8, 9], [0, 5]]


@needs_host
@pytest.mark.parametrize("name", ["bigram", "tied"])
@pytest.mark.parametrize("draft_vocab", [None, 96])
def test_random_drafter_greedy_is_lossless(targets, name, draft_vocab):
    hf, host = targets[name]
    torch.manual_seed(3)
    drafter = new_eagle3_drafter(host, draft_vocab).eval()
    if draft_vocab:
        d2t, t2d = build_vocab_map(torch.rand(VOCAB), draft_vocab)
        drafter.set_vocab_map(d2t, t2d)
    kv = eagle_compat.new_kv_cache(host)
    for prompt in PROMPTS:
        prompt = torch.tensor([prompt])
        result = generate_eagle3(host, drafter, prompt, 24, depth=3, top_k=4, total_tokens=12, kv_cache=kv)
        _check(result, prompt, _hf_greedy(hf, prompt, 24), 24, depth=3)


@needs_host
@pytest.mark.parametrize("reduced", [False, True])
def test_oracle_drafter_greedy_is_lossless_with_deep_acceptance(targets, reduced):
    hf, host = targets["bigram"]
    t2d = None
    if reduced:  # keep the ids the target actually produces plus a random half of the rest
        torch.manual_seed(5)
        t2d = torch.rand(VOCAB) < 0.5
        for prompt in PROMPTS:
            t2d[_hf_greedy(hf, torch.tensor([prompt]), 40)] = True
    drafter = _oracle(hf, host, int(t2d.sum()) if reduced else None, t2d)
    accepted = []
    for prompt in PROMPTS:
        prompt = torch.tensor([prompt])
        result = generate_eagle3(host, drafter, prompt, 40, depth=4, top_k=3, total_tokens=16)
        _check(result, prompt, _hf_greedy(hf, prompt, 40), 40, depth=4)
        accepted += result.accept_lengths
    assert max(accepted) >= 3 and sum(accepted) / len(accepted) > 1.0, accepted


@needs_host
def test_eos_stops_and_sampling_runs(targets):
    hf, host = targets["tied"]
    torch.manual_seed(0)
    drafter = new_eagle3_drafter(host).eval()
    prompt = torch.tensor([PROMPTS[0]])
    reference = _hf_greedy(hf, prompt, 30)
    eos = reference[5]
    first = reference.index(eos)  # may be earlier than 5 if the target repeats itself
    result = generate_eagle3(host, drafter, prompt, 30, depth=2, top_k=3, total_tokens=8, eos_token_id=eos)
    generated = result.output_ids[0, prompt.shape[1]:].tolist()
    assert generated[:first + 1] == reference[:first + 1]
    assert first + 1 <= result.new_tokens <= first + 1 + 2 + 1  # stops in the cycle that commits the EOS
    gen = torch.Generator().manual_seed(0)
    result = generate_eagle3(host, drafter, prompt, 20, temperature=0.8, depth=2, top_k=3, total_tokens=8,
                             generator=gen)
    assert sum(result.accept_lengths) + result.cycles == result.new_tokens >= 20
    with pytest.raises(ValueError):
        generate_eagle3(host, drafter, prompt, 10_000)


# ----------------------------------------------------------------------------------------------
# Real target


@needs_host
@pytest.mark.slow
def test_smollm2_greedy_eagle3_is_lossless():
    """Real SmolLM2 target (tied embeddings, rope_theta 1e5), random-init EAGLE-3 drafter with a reduced
    vocabulary, 3 MT-Bench first turns: 64 new tokens == HF greedy, default EAGLE-3 tree (60/7/10)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppow_plugin.host.assets import default_target_dir
    from ppow_plugin.data.samples import format_prompt
    from ppow_plugin.data.datasets import load_mt_bench

    target_dir = default_target_dir(prepare=True)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    host = eagle_compat.load_host_target(target_dir)
    torch.manual_seed(0)
    drafter = new_eagle3_drafter(host, 8192).eval()
    counts = torch.rand(hf.config.vocab_size, generator=torch.Generator().manual_seed(0))
    drafter.set_vocab_map(*build_vocab_map(counts, 8192))
    kv = eagle_compat.new_kv_cache(host)
    questions = {q.category: q for q in load_mt_bench()}
    for category in ("writing", "reasoning", "coding"):
        prompt = torch.tensor([format_prompt(tokenizer, questions[category].turns[0])])
        reference = hf.generate(prompt, max_new_tokens=64, do_sample=False)[0, prompt.shape[1]:].tolist()
        result = generate_eagle3(host, drafter, prompt, 64, kv_cache=kv)
        generated = result.output_ids[0, prompt.shape[1]:].tolist()
        assert generated[:len(reference)] == reference, category
        assert sum(result.accept_lengths) + result.cycles == result.new_tokens == len(generated)
