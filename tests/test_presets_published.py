"""The presets of published models are what moekit reads from their published config.json
(tests/fixtures/hf_configs): the same ModelConfig, field for field, so the audit table and
``moekit inspect <preset>`` count the released architecture."""

import json
from pathlib import Path

import pytest

from moekit.interop import config_from_hf
from moekit.presets import get_preset

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
PUBLISHED = {"gpt-oss-20b": "gpt-oss-20b", "gpt-oss-120b": "gpt-oss-120b", "deepseek-v2": "DeepSeek-V2",
             "deepseek-v2-lite": "DeepSeek-V2-Lite", "deepseek-r1": "DeepSeek-V3",
             "deepseek-v4": "DeepSeek-V4-Flash",
             "llama4-scout": "Llama-4-Scout-17B-16E", "llama4-maverick": "Llama-4-Maverick-17B-128E-text"}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_preset_equals_the_published_config(preset):
    hf = json.loads((FIXTURES / PUBLISHED[preset] / "config.json").read_text())
    loaded = config_from_hf(hf).to_dict()
    loaded.pop("hf_architecture")
    ours = get_preset(preset).to_dict()
    ours.pop("hf_architecture")
    assert ours == loaded
