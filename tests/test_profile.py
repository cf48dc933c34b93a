"""`ppow profile`: the speedup model by hand, and a timing run on a tiny random Llama target."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ppow_plugin import cli
from ppow_plugin.host import patching
from ppow_plugin.errors import UserError
from ppow_plugin.evaluation.profile import extend_rates, modelled_speedup, spread


def test_extend_rates_geometric_past_measured_depth() -> None:
    assert extend_rates([0.5, 0.25], 4) == [0.5, 0.25, 0.125, 0.0625]
    assert extend_rates([0.6], 3) == pytest.approx([0.6, 0.36, 0.216])
    assert extend_rates([0.9, 0.5, 0.2], 2) == [0.9, 0.5]


def test_modelled_speedup_hand_computed() -> None:
    rates = [0.5, 0.25, 0.125]
    assert modelled_speedup(1, rates, gamma=0.1, verify_ratio=1.0) == 1.0  # no draft: plain decoding
    # N = 3: (1 + 0.5 + 0.25) / (2 * 0.1 + 1.2)
    assert modelled_speedup(3, rates, gamma=0.1, verify_ratio=1.2) == pytest.approx(1.75 / 1.4)


def test_spread_fields() -> None:
    s = spread([1.0, 3.0])
    assert (s["mean"], s["min"], s["max"], s["per_repeat"]) == (2.0, 1.0, 3.0, [1.0, 3.0])
    assert s["std"] == pytest.approx(2 ** 0.5) and spread([4.0])["std"] == 0.0


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile_target")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 rope_theta=1e5)).save_pretrained(out)
    return out


@pytest.mark.skipif(patching.patch_status().state in ("missing", "wrong-version"),
                    reason="eagle-llm 1.2.1 is not installed")
def test_cli_profile_writes_gamma_and_spread(tiny_target: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"stats": {"overall": {"accept_rates": [0.6, 0.3, 0.1]}}}))
    out = tmp_path / "profile.json"
    rc = cli.main(["profile", "--target", str(tiny_target), "--repeats", "2", "--tree-sizes", "1,4,8",
                   "--prefix-len", "16", "--eval-report", str(report), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert isinstance(result["gamma"], float) and result["gamma"] > 0
    for key in ("mean", "std", "min", "max"):
        assert key in result["gamma_spread"] and key in result["target_step_s"]
    assert len(result["gamma_spread"]["per_repeat"]) == 2
    assert set(result["verify_s"]) == {"1", "4", "8"}
    assert result["model"]["best_tree_size"] in (1, 4, 8) and result["model"]["rates"][:3] == [0.6, 0.3, 0.1]


def test_profile_rejects_bad_counts_before_loading(tmp_path: Path) -> None:
    from ppow_plugin.evaluation.profile import profile
    with pytest.raises(UserError, match="--repeats"):
        profile(tmp_path, repeats=0)


@pytest.mark.skipif(patching.patch_status().state in ("missing", "wrong-version"),
                    reason="eagle-llm 1.2.1 is not installed")
def test_profile_times_an_eagle3_drafter(tmp_path: Path) -> None:
    """An EAGLE-3 dir (reduced vocabulary) is detected and its own step is timed, not a random EAGLE-1 one."""
    from ppow_plugin.drafters.eagle3 import Eagle3Config, Eagle3Drafter
    from ppow_plugin.drafters.export import save_eagle3_dir
    from ppow_plugin.evaluation.profile import profile
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e5)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "target")
    cfg = Eagle3Config.from_target_config(config, 32)
    save_eagle3_dir(tmp_path / "e3", Eagle3Drafter(cfg).state_dict(), cfg.to_hf_dict(), {})
    result = profile(tmp_path / "target", tmp_path / "e3", repeats=1, tree_sizes=(1, 4), prefix_len=8, inner=2)
    assert result["settings"]["drafter_type"] == "eagle3" and result["gamma"] > 0
    assert profile(tmp_path / "target", None, repeats=1, tree_sizes=(1,), prefix_len=8,
                   inner=1)["settings"]["drafter_type"] == "eagle1"
