"""Chat templates render byte-identical to transformers' apply_chat_template(tokenize=False):
the published templates of Mixtral-Instruct, Qwen2, Qwen3 and DeepSeek-V3 (fixtures/chat_templates,
see its README for sources) over several conversations; and a template that rejects a
conversation is one clear line."""

import json
from pathlib import Path

import hf_tokenizers as H
import pytest

from moekit.errors import UsageError
from moekit.inference.chat_template import ChatTemplateError, render_chat
from moekit.inference.tokenization import load_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# template file -> the tokenizer folder it ships with (special tokens the template reads)
MODELS = {"mixtral_instruct": H.mixtral_like, "qwen2": H.qwen_like, "qwen3": H.qwen_like, "deepseek_v3": H.deepseek_like}

SYSTEM = {"role": "system", "content": "You are a terse assistant. Réponds en français si on te parle français."}
USER = {"role": "user", "content": "Which expert handles 日本語 and emoji 🙂?"}
ASSISTANT = {"role": "assistant", "content": "The router decides: top-2 of 8 experts.\n\nSee below."}
USER2 = {"role": "user", "content": "  And  with   spaces, quotes \" ' and <tags> & {{ braces }}?  "}
CONVERSATIONS = {
    "single": [USER],
    "system": [SYSTEM, USER],
    "multi_turn": [SYSTEM, USER, ASSISTANT, USER2],
    "no_system_multi": [USER, ASSISTANT, USER2],
    "ends_with_assistant": [USER, ASSISTANT],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, build in MODELS.items():
        template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        out[name] = build(tmp_path_factory.mktemp(name), chat_template=template)
    return out


def both(folder, messages, **kw):
    ours = load_tokenizer(folder).apply_chat_template(messages, **kw)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False, **kw)
    return ours, theirs


def test_fixtures_are_the_published_templates():
    # Spot checks that each file is the model's own template, not a paraphrase.
    text = {p.stem: p.read_text(encoding="utf-8") for p in TEMPLATES.glob("*.jinja")}
    assert set(text) == set(MODELS)
    assert "raise_exception('After the optional system message, conversation roles must alternate" in text[
        "mixtral_instruct"]
    assert "<｜tool▁outputs▁begin｜>" in text["deepseek_v3"] and "is_first_sp=true" in text["deepseek_v3"]
    assert "enable_thinking is defined and enable_thinking is false" in text["qwen3"]
    assert "You are a helpful assistant." in text["qwen2"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("model", MODELS)
def test_render_is_byte_identical_to_transformers(folders, model, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours, theirs = both(folders[model], messages, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.encode("utf-8") == theirs.encode("utf-8")
    assert USER["content"] in ours


def test_qwen3_thinking_switch_and_reasoning_content(folders):
    reasoning = {"role": "assistant", "content": "Two experts.", "reasoning_content": "Count the top-k."}
    inline = {"role": "assistant", "content": "<think>\nCount.\n</think>\n\nTwo experts."}
    for messages in ([USER, reasoning], [USER, inline], [USER, reasoning, USER2]):
        for kw in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            ours, theirs = both(folders["qwen3"], messages, add_generation_prompt=True, **kw)
            assert ours == theirs
    ours, _ = both(folders["qwen3"], [USER], enable_thinking=False)
    assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_qwen3_tools_and_tool_calls(folders):
    # tools go through the tojson filter: transformers' own (no HTML escaping, non-ASCII kept).
    tools = [{"type": "function", "function": {"name": "route", "description": "Pick <experts> & log — ok",
                                               "parameters": {"type": "object", "properties": {"k": {"type": "integer"}}}}}]
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "route", "arguments": {"k": 2, "note": "é"}}}]}
    messages = [SYSTEM, USER, call, {"role": "tool", "content": "{\"experts\": [3, 5]}"}]
    ours, theirs = both(folders["qwen3"], messages, tools=tools, add_generation_prompt=True)
    assert ours == theirs
    assert '"description": "Pick <experts> & log — ok"' in ours


def test_deepseek_tool_calls_with_null_content(folders):
    # transformers drops None values before rendering; DeepSeek-V3's template then reads a missing
    # 'content' and fails. Same failure here, as one line, not a different rendering.
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "route", "arguments": "{\"k\": 2}"}}]}
    messages = [USER, call, {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "Done."}]
    with pytest.raises(ChatTemplateError, match="has no attribute 'content'"):
        load_tokenizer(folders["deepseek_v3"]).apply_chat_template(messages)
    with pytest.raises(Exception, match="has no attribute 'content'"):
        transformers.AutoTokenizer.from_pretrained(str(folders["deepseek_v3"])).apply_chat_template(
            messages, tokenize=False)
    call["content"] = ""  # with content present it renders as a plain assistant turn; identically
    ours, theirs = both(folders["deepseek_v3"], messages, add_generation_prompt=True)
    assert ours == theirs


def test_raise_exception_is_one_line_usage_error(folders):
    bad = [USER, USER2]  # Mixtral requires alternating user/assistant turns
    tok = load_tokenizer(folders["mixtral_instruct"])
    with pytest.raises(UsageError) as e:
        tok.apply_chat_template(bad)
    assert isinstance(e.value, ChatTemplateError)
    assert str(e.value) == ("chat template: After the optional system message, conversation roles must "
                            "alternate user/assistant/user/assistant/...")
    with pytest.raises(Exception, match="conversation roles must alternate"):
        transformers.AutoTokenizer.from_pretrained(str(folders["mixtral_instruct"])).apply_chat_template(
            bad, tokenize=False)


def test_template_errors_are_one_line():
    specials = {"bos_token": "<s>"}
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja \(line 1"):
        render_chat("{% if %}", [USER], specials)
    with pytest.raises(ChatTemplateError, match="chat template: ") as e:
        render_chat("{{ messages[0]['content'] + none_thing.x }}", [USER], specials)
    assert "\n" not in str(e.value)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat("{{ 'x' }}", [], specials)


def test_sandbox_and_globals_match_transformers(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
                "{{ {'a': 'é<&>'} | tojson(indent=2) }}{{ strftime_now('%Y') | length }}{{ custom }}")
    folder = H.deepseek_like(tmp_path, chat_template=template)
    ours, theirs = both(folder, [USER, USER2], custom="kw wins")
    assert ours == theirs
    assert ours.startswith("<｜begin▁of▁sentence｜>")
    tok = load_tokenizer(folder)
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        render_chat(escape + "{{ ''.__class__ }}{{ messages.append(1) }}", [USER], tok.special_tokens)


def test_named_special_tokens_reach_the_template(tmp_path):
    folder = H.qwen_like(tmp_path, chat_template="[{{ eos_token }}|{{ pad_token }}|{{ bos_token }}]")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    ours, theirs = both(folder, [USER])
    assert ours == theirs == "[<|im_end|>|<|endoftext|>|]"
    assert config["eos_token"] == "<|im_end|>"
