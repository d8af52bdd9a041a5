"""A SpotlineError from any command comes out as one line, "Error: <what went wrong>", with
exit status 1 and no traceback: the main group converts it (spotline/cli/__init__.py), so the
commands let it through rather than each wrapping it again."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from spotline.cli import cli


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
