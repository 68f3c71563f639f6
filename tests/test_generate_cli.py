"""`moekit generate` and `moekit chat` on a real Hugging Face folder (tiny random Mixtral-shaped
model exported with save_pretrained, a trained byte-level tokenizer, the published Qwen2 chat
template): streamed text equals the engine's, --json and --show-routing records, the REPL, and
bad input as one line with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tokenizers import qwen_like

import moekit
from moekit.cli import main
from moekit.inference.engine import Engine
from moekit.inference.loading import load_for_inference
from moekit.inference.sampling import SamplingParams

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_model")
    qwen_like(path, chat_template=(TEMPLATES / "qwen2.jinja").read_text())
    from moekit.inference.tokenization import load_tokenizer

    vocab = load_tokenizer(path).vocab_size
    torch.manual_seed(0)
    cfg = moekit.ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40,
                             max_seq_len=128, init_std=0.3,
                             moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2))
    moekit.MoETransformer(cfg).save_pretrained(path, architecture="MixtralForCausalLM")
    return path


def test_generate_streams_the_engines_text_and_json_has_ids_and_rates(folder, capsys):
    prompt = "the router learns which expert"
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    streamed = capsys.readouterr().out
    model, tok, defaults = load_for_inference(folder)
    seq = Engine(model, tok, record_routing=True).generate([tok.encode(prompt)], SamplingParams(max_new_tokens=8, temperature=0,
                                                                           stop_token_ids=tuple(defaults.eos_ids)))[0]
    assert streamed == seq.text + "\n"
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0",
                 "--json", "--show-routing"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["output_ids"] == seq.output_ids and rec["text"] == seq.text
    assert rec["prompt_ids"] == tok.encode(prompt) and rec["decode_tokens_per_s"] > 0
    assert [r["experts"] for r in rec["routing"]] == seq.routing  # [token][MoE layer][K]
    assert len(seq.routing) == len(seq.output_ids) and all(len(r) == 2 and len(r[0]) == 2 for r in seq.routing)


def test_show_routing_table_and_prompt_from_stdin(folder):
    out = subprocess.run([sys.executable, "-m", "moekit", "generate", str(folder), "--prompt-file", "-",
                          "--max-new-tokens", "4", "--show-routing", "--seed", "3", "--temperature", "1"],
                         input="every token", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("token")))
    assert lines[head].split()[1:] == ["L0", "L1"] and len(lines) - head - 1 == 4


def test_chat_repl_keeps_history_and_resets(folder):
    script = "hello there\nand again\n/reset\nhello there\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "moekit", "chat", str(folder), "--max-new-tokens", "5",
                          "--temperature", "0"], input=script, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model, tok, _ = load_for_inference(folder)
    reply = lambda messages: Engine(model, tok).generate(  # noqa: E731
        [tok.encode_chat(messages)], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=tuple(tok.eos_ids)))[0].text
    first = reply([{"role": "user", "content": "hello there"}])
    second = reply([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and again"}])
    assert out.stdout == f"{first}\n{second}\n{first}\n"  # the history goes in; after /reset it is gone
    assert "conversation cleared" in out.stderr


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be <= 1, got 1.5"),
    (["--top-p", "0"], "--top-p must be > 0"),
    (["--prompt", "the model " * 100], "context is 128; shorten it or pass --truncate left"),
])
def test_bad_input_is_one_line_exit_2(folder, extra, message, capsys):
    args = ["generate", str(folder), "--prompt", "the"] + extra
    if extra[0] == "--prompt":
        args = ["generate", str(folder)] + extra
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_truncate_left_keeps_the_last_tokens(folder, capsys):
    long = "the model routes every token " * 60
    assert main(["generate", str(folder), "--prompt", long, "--max-new-tokens", "4", "--truncate", "left",
                 "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["prompt_ids"]) == 128 - 4 and len(rec["output_ids"]) == 4


def test_folder_without_tokenizer_and_raising_template(folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    assert main(["generate", str(bare), "--prompt", "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    raising = tmp_path / "raising"
    raising.mkdir()
    for p in folder.iterdir():
        (raising / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((raising / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('roles must alternate user/assistant') }}"
    (raising / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "moekit", "chat", str(raising)], input="hi\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "roles must alternate" in out.stderr and out.stderr.count("\n") == 1


def test_nan_weights_are_refused_unless_the_check_is_skipped(folder, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(folder, poisoned)
    weights = poisoned / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    argv = ["generate", str(poisoned), "--prompt", "x", "--max-new-tokens", "2", "--temperature", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert name in err and "NaN" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(argv + ["--no-check-finite", "--force"]) == 0


def test_prefill_chunk_changes_nothing_but_the_steps(folder, capsys):
    """--prefill-chunk 3 prefills the prompt over several forwards: the same tokens as one forward."""
    prompt = "the router learns which expert each token goes to"
    outs = []
    for chunk in ("0", "3"):
        assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0",
                     "--json", "--prefill-chunk", chunk]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["output_ids"] == outs[1]["output_ids"] and outs[0]["prompt_tokens"] > 3


def test_chat_drops_the_oldest_exchanges_when_the_context_fills(folder):
    """Context 128: after a few long turns the oldest exchanges go (system message kept), the
    reply is what the model gives to the trimmed conversation, and an over-long message alone
    is refused without ending the session."""
    long_msg = "the experts " * 12
    script = f"{long_msg}\n{long_msg}one\n{long_msg}two\n{'x ' * 200}\nshort\n/exit\n"
    out = subprocess.run([sys.executable, "-m", "moekit", "chat", str(folder), "--max-new-tokens", "3",
                          "--temperature", "0", "--system", "be brief"], input=script, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "oldest messages to fit the context of 128 tokens" in out.stderr
    assert "this message alone fills the context" in out.stderr
    model, tok, _ = load_for_inference(folder)
    replies = out.stdout.split("\n")[:-1]
    assert len(replies) == 4  # three long turns and "short"; the over-long one got no reply
    history = [{"role": "system", "content": "be brief"}]
    want = []
    for msg in [long_msg, long_msg + "one", long_msg + "two", "short"]:
        history.append({"role": "user", "content": msg})
        while len(tok.encode_chat(history)) >= 128:
            del history[1:3]
        seq = Engine(model, tok).generate([tok.encode_chat(history)], SamplingParams(
            max_new_tokens=3, temperature=0, stop_token_ids=tuple(tok.eos_ids)))[0]
        want.append(seq.text)
        history.append({"role": "assistant", "content": seq.text})
    assert replies == want
