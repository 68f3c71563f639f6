"""``moekit serve`` as a user runs it: a subprocess on a free port, then Ctrl-C; bad input is one
line and exit 2 before anything loads."""

from __future__ import annotations

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


def test_serve_subprocess_answers_the_openai_client_and_stops_on_ctrl_c(folder):
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(folder), "--port", "0", "--max-batch", "2",
                             "--served-model-name", "cli-model", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, seen, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = match and match.group(1)
        assert url, "".join(seen)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1 and r.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "moekit: interrupted" in out, out  # the CLI's exit for Ctrl-C
    assert "Traceback" not in out and "Application shutdown complete" in out
