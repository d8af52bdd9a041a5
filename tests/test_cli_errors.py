"""A SpotlineError from any command comes out as one line, "Error: <what went wrong>", with
exit status 1 and no traceback: the main group converts it (spotline/cli/__init__.py), so the
commands let it through rather than each wrapping it again."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from click.testing import CliRunner

from spotline.cli import cli
from spotline.common.embedded import EmbeddedRedis
from spotline.common.settings import Settings, settings_env


def test_a_command_error_is_one_line_and_status_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["data", "check", str(tmp_path)], env={})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output == (f"Error: no TIL dataset at {tmp_path} "
                             "(expected vlm.jsonl and images/)\n")


def test_an_error_in_a_nested_group_before_any_redis(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("not-a-secret\n")
    result = CliRunner().invoke(cli, ["sink", "webhook", "http://127.0.0.1:9/hook",
                                      "--secret-file", str(secrets)], env={})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: {secrets}: a webhook secret is whsec_<base64>")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_a_result_timeout_is_one_line_and_status_1(tmp_path: Path, redis_server: EmbeddedRedis,
                                                  settings: Settings) -> None:
    """No worker runs here: the frame is published, its result never comes."""
    ok, jpeg = cv2.imencode(".jpg", np.full((32, 48, 3), 90, np.uint8))
    assert ok
    (tmp_path / "a.jpg").write_bytes(jpeg.tobytes())
    env = {**settings_env(settings), "SPOTLINE_REDIS_URL": redis_server.url}
    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "a.jpg"), "-c", "x", "--wait",
                                      "--timeout", "0.5", "--no-progress"], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines()[-1].startswith("Error: no result after 0s for 1 frame(s)")
    assert "Traceback" not in result.output
