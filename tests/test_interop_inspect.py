"""Counting published MoE models from their config.json alone, against the publishers' figures.

The fixtures are the released config.json files, unchanged. Published figures are rounded, and
count the embedding and output matrices in the active parameters; DeepSeek-V3's exclude its
multi-token-prediction module (recounts give 37.5B active), so each must match within 2%.
"""

import json
from pathlib import Path

import pytest

from moekit import count_params, get_preset
from moekit.cli import main
from moekit.interop import config_from_hf

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
# folder: (published total, published active, the matching preset)
PUBLISHED = {
    "Mixtral-8x7B-v0.1": (46.7e9, 12.9e9, "mixtral-8x7b"),
    "Mixtral-8x22B-v0.1": (141e9, 39e9, "mixtral-8x22b"),
    "DeepSeek-V3": (671e9, 37e9, "deepseek-v3"),
    "Qwen1.5-MoE-A2.7B": (14.3e9, 2.7e9, "qwen1.5-moe-a2.7b"),
    "Qwen3-30B-A3B": (30.5e9, 3.3e9, "qwen3-30b-a3b"),
    "OLMoE-1B-7B-0924": (6.9e9, 1.3e9, "olmoe-1b-7b"),
}


def fixture_config(folder: str):
    return config_from_hf(json.loads((FIXTURES / folder / "config.json").read_text()))


@pytest.mark.parametrize("folder", PUBLISHED)
def test_counts_match_published_figures(folder):
    total, active, _ = PUBLISHED[folder]
    pc = count_params(fixture_config(folder))
    assert pc.total == pytest.approx(total, rel=0.02)
    assert pc.active == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("folder", PUBLISHED)
def test_preset_counts_equal_the_published_config(folder):
    preset = get_preset(PUBLISHED[folder][2])
    from_hf = fixture_config(folder)
    assert count_params(preset) == count_params(from_hf)
    assert preset.moe_layer_ids == from_hf.moe_layer_ids
    assert preset.rope_scaling == from_hf.rope_scaling and preset.moe.router == from_hf.moe.router


def test_cli_inspect_reads_config_json_and_folder(capsys):
    assert main(["inspect", str(FIXTURES / "DeepSeek-V3" / "config.json"), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(FIXTURES / "DeepSeek-V3"), "--json"]) == 0
    captured = capsys.readouterr()
    from_folder = json.loads(captured.out)
    assert "1 multi-token-prediction layer(s) not counted" in captured.err
    pc = count_params(fixture_config("DeepSeek-V3"))
    for out in (from_file, from_folder):
        assert (out["total_params"], out["active_params"]) == (pc.total, pc.active)
        assert out["moe_layers"] == 58 and out["config"]["attention"] == "mla"
    assert main(["inspect", str(FIXTURES / "Mixtral-8x7B-v0.1")]) == 0
    captured = capsys.readouterr()
    assert "46.70B" in captured.out and "12.88B" in captured.out
    assert "multi-token" not in captured.err
