"""``moekit serve`` as a user runs it: a subprocess on a free port, then Ctrl-C; bad input is one
line and exit 2 before anything loads."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from moekit.cli import main
from serve_helpers import model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("served-model"))


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--port", "70000"], "--port must be in"),
    (["--dtype", "fp7"], "unknown dtype"),
])
def test_bad_flags_are_one_line_and_exit_2(folder, capsys, argv, message):
    assert main(["serve", str(folder), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_every_flag_has_help():
    from moekit.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert all(a.help for a in serve._actions)


@contextlib.contextmanager
def _served(folder, *flags):
    """``moekit serve FOLDER`` in a subprocess on a free port -> (openai client, the output so far);
    stopped with Ctrl-C on leaving, and its whole output appended to the list."""
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(folder), "--port", "0", "--max-batch", "2",
                             "--served-model-name", "cli-model", "--threads", "1", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        url, deadline = None, time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = match and match.group(1)
        assert url, "".join(seen)
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30), seen
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        seen.append(out)
        seen.append(f"exit status {proc.returncode}")


def test_serve_subprocess_answers_the_openai_client_and_stops_on_ctrl_c(folder):
    with _served(folder) as (c, seen):
        r = c.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1 and r.choices[0].message.role == "assistant"
    out = "".join(seen)
    assert seen[-1] == "exit status 130" and "moekit: interrupted" in out, out  # the CLI's exit for Ctrl-C
    assert "Traceback" not in out and "Application shutdown complete" in out


def test_serve_with_offloaded_experts_answers_as_the_in_memory_model(folder):
    """--expert-cache-gb streams the experts from a disk store behind a cache too small for all
    of them: greedy completions are the in-memory engine's, token for token."""
    from moekit.inference.engine import Engine
    from moekit.inference.loading import load_for_inference
    from moekit.inference.sampling import SamplingParams

    model, tok, _ = load_for_inference(folder, dtype="fp32")
    prompts = ["The quick brown fox", "def main():"]
    expected = [Engine(model, tok, max_batch=1).generate([tok.encode(p)], SamplingParams(
        max_new_tokens=12, temperature=0))[0].output_ids for p in prompts]
    with _served(folder, "--expert-cache-gb", "0.0002", "--offload-store", "disk") as (c, seen):
        got = [c.completions.create(model="cli-model", prompt=p, max_tokens=12, temperature=0, logprobs=None)
               for p in prompts]
    out = "".join(seen)
    assert "Traceback" not in out and "2 of 4 experts cached per MoE layer" in out, out
    assert [r.choices[0].text for r in got] == [tok.decode(ids) for ids in expected]
