"""Counts for every transformers-loadable family equal transformers' own model of a published config.

The transformers model is built on the meta device: shapes only, no weights allocated, so a
671B-parameter DeepSeek-V3 is counted in seconds.
"""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moekit.accounting import count_params  # noqa: E402
from moekit.interop import config_from_hf, supported_architectures  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
CONFIGS = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


def _architecture(name: str) -> str:
    return json.loads((FIXTURES / name / "config.json").read_text())["architectures"][0]


def test_every_supported_family_has_a_published_config():
    assert {_architecture(n) for n in CONFIGS} >= set(supported_architectures())


@pytest.mark.parametrize("name", CONFIGS)
def test_count_equals_transformers_meta_model(name):
    folder = FIXTURES / name
    data = json.loads((folder / "config.json").read_text())
    hf_cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    theirs = sum(p.numel() for p in model.parameters())
    ours = count_params(config_from_hf(data)).total
    assert abs(ours - theirs) / theirs < 1e-3, (ours, theirs)
