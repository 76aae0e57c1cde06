"""``inferos config path|init|show`` (the plugin's settings and their layers) and ``inferos agent`` (the sidecar).

    inferos config path              where the user's copy of the plugin config lives
    inferos config init              write that copy from the shipped plugin.toml (edit it; servers hot-reload it)
    inferos config show [--json]     the settings a server started now would use, and the layers they came from
    inferos agent [--config FILE]    the controller and its control API alone (several servers, one agent)
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import click

from lemonade_inferos.cli.common import console, handle_errors


@click.group("config")
def config_group() -> None:
    """The inferos plugin's settings (defaults < plugin.toml < your copy < --config < INFEROS_* < options)."""


@config_group.command("path")
def path() -> None:
    """Print the path of your copy of the plugin config (INFEROS_CONFIG_DIR moves it)."""
    from lemonade_inferos.config.settings import user_config_path

    click.echo(str(user_config_path()))


@config_group.command("init")
@click.option("--force", is_flag=True, help="Replace an existing copy.")
@handle_errors
def init(force: bool) -> None:
    """Write your copy of the plugin config from the shipped plugin.toml."""
    from lemonade_inferos.durable import atomic_write
    from lemonade_inferos.config.settings import shipped_config_path, user_config_path

    target = user_config_path()
    if target.exists() and not force:
        raise ValueError(f"{target} exists; --force replaces it")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, shipped_config_path().read_text(encoding="utf-8"))
    click.echo(f"wrote {target}: edit [plugin.config]; running servers reload it within a second")


@config_group.command("show")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="The --config file a server would be given.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="A plugin option (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def show(config_path: Path | None, options: tuple[str, ...], as_json: bool) -> None:
    """The settings from every layer, validated (a bad layer is named with its line and field)."""
    from lemonade_inferos.config.settings import SettingsSources

    given = dict(item.split("=", 1) for item in options if "=" in item)
    if config_path is not None:
        given["config"] = str(config_path)
    sources = SettingsSources(options=given)
    settings = sources.load()
    document = {"layers": sources.layer_sources, "settings": settings.model_dump(mode="json")}
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    console.print("layers, later ones winning: " + " < ".join(["defaults", *document["layers"]]))
    console.print_json(json.dumps(document["settings"]))


@click.command("agent")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Policy config file (YAML/TOML, infer_os: root), watched for edits.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Control API port (default 7031, or INFEROS_AGENT_PORT).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@handle_errors
def agent(config_path: Path | None, port: int | None, log_level: str) -> None:
    """Run the controller and its control API alone: servers started with INFEROS_AGENT_URL take their policy from
    it and report their stats to it."""
    from lemonade_inferos.controller.controller import Controller
    from lemonade_inferos.controller.server import ControlServer
    from lemonade_inferos.config.settings import SettingsSources

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    options = {"agent_url": ""}  # an agent follows no other agent (INFEROS_AGENT_URL is for its servers)
    if config_path is not None:
        options["config"] = str(config_path)
    if port is not None:
        options["control_port"] = str(port)
    controller = Controller(SettingsSources(options=options), server_id="agent")
    server = ControlServer(controller, controller.settings.control_port)
    if not server.start():
        raise ValueError(server.error or "the control API did not start")
    controller.start()
    click.echo(f"inferos agent: control API on http://127.0.0.1:{server.port}/v1 (Ctrl+C stops it)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    controller.stop()
    server.stop()
    click.echo("inferos agent stopped")
