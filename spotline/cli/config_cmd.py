"""`spotline --version` and `spotline config`: which spotline this is, and the settings every
command would run with, each with where it came from (secrets masked)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click

from spotline.common.settings import (
    ENV_PREFIX,
    Settings,
    describe,
    load_settings,
    origins,
    shown,
)
from spotline.train.demo import DEMO_DIR, SETTINGS_FILE, apply_demo_models

REPO = Path(__file__).resolve().parents[2]


def version_text() -> str:
    """``spotline 0.1.0``, with the git commit when run from a checkout."""
    try:
        text = f"spotline {version('spotline')}"
    except PackageNotFoundError:
        text = "spotline (not installed)"
    commit = git_commit()
    return f"{text} (git {commit})" if commit else text


def git_commit() -> str:
    """The short commit of the checkout spotline runs from; '' when it is not one."""
    if not (REPO / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The eager ``--version`` flag: print and exit before any settings are read."""
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


def effective(config_file: str | None, log_level: str | None) -> dict[str, dict[str, Any]]:
    """Every setting as the commands get it: value (secrets masked), where it came from,
    its environment variable and its default."""
    base = load_settings(config_file=config_file, log_level=log_level)
    settings = apply_demo_models(base)
    sources = origins(config_file=config_file, log_level=log_level)
    demo = f"demo models {DEMO_DIR / SETTINGS_FILE}"
    defaults = Settings()
    out = {}
    for key, _default, meaning in describe():
        value = getattr(settings, key)
        source = demo if value != getattr(base, key) else sources[key]
        out[key] = {"value": _plain(key, value), "source": source,
                    "env": ENV_PREFIX + key.upper(),
                    "default": _plain(key, getattr(defaults, key)), "help": meaning}
    return out


def _plain(key: str, value: Any) -> Any:
    """JSON- and TOML-friendly (a tuple as a list), secrets masked."""
    return shown(key, list(value) if isinstance(value, tuple) else value)


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings and where each came from: default, a settings file
    (--config or SPOTLINE_CONFIG), a SPOTLINE_<KEY> variable, an option, or the demo models'
    settings (models/demo/settings.toml, applied when no weights are set). Secrets (API keys,
    passwords in URLs) are masked. The lines are valid TOML: a settings file to start from."""
    params = ctx.find_root().params
    rows = effective(params.get("config_file"), params.get("log_level"))
    if as_json:
        click.echo(json.dumps({"version": version_text(), "settings": rows}, indent=2))
        return
    click.echo(f"# {version_text()}: effective settings (later sources win: default < settings "
               f"file < {ENV_PREFIX}* < option; the demo models' settings replace defaults)")
    for key, row in rows.items():
        click.echo(f"{key} = {json.dumps(row['value'])}  # {row['source']}")


__all__ = ["config", "effective", "print_version", "version_text"]
