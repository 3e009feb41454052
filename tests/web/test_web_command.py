"""`closesync web` as a command: its settings and flags, its dev mode, and a lazy startup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from closesync.cli.main import main
from closesync.store.keys import Keys
from closesync.store.secretbox import generate_key
from tests._web import web_command


@pytest.mark.parametrize(
    ("name", "value"),
    [("WEB_WORKERS", "0"), ("WEB_THREADS", "many"), ("WEB_TIMEOUT_SECONDS", "-1")],
)
def test_web_bad_setting_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    name: str,
    value: str,
) -> None:
    """A bad WEB_* setting stops `closesync web` before it serves: exit 2, the setting named."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv(name, value)
    assert main(["web", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert name in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--workers", "--threads"])
def test_web_flag_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    """`--workers 0` or `--threads 0` exits 2 with a message naming the flag."""
    with pytest.raises(SystemExit) as stopped:
        main(["web", flag, "0"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    assert "at least 1" in err


def test_cli_help_does_not_import_the_web_stack() -> None:
    """`closesync --help` (and every command's parser) starts without Flask, werkzeug, gunicorn."""
    probe = (
        "import sys\n"
        "from closesync.cli.main import build_parser\n"
        "parser = build_parser()\n"
        "try:\n"
        "    parser.parse_args(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in ('flask', 'werkzeug', 'gunicorn') if m in sys.modules)\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "usage: closesync" in done.stdout
    assert "LOADED []" in done.stderr


def test_web_dev_mode_serves_from_one_process(redis_url: str, keys: Keys, tmp_path: Path) -> None:
    """`closesync web --dev` serves the same app on werkzeug's server, without gunicorn."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": keys.prefix,
        "CLOSESYNC_ENCRYPTION_KEYS": generate_key(),
        "LOG_FORMAT": "json",
    }
    env.pop("PORT", None)
    with web_command(["--dev", "--port", "0"], env, tmp_path) as web:
        assert "development server" in web.wait_for(r"^closesync web on").string
        assert requests.get(web.url + "/healthz?state=Zq8vN3kR7pXw2LmT", timeout=10).text == "ok\n"
        web.wait_for(r"web GET /healthz 200")
    assert "gunicorn" not in web.text()
    assert "Zq8vN3kR7pXw2LmT" not in web.text()
