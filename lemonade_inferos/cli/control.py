"""``inferos policy|metrics|baseline|dashboard``: the commands and their small client of the control API."""

from __future__ import annotations

import json
import os
from typing import Any

import click
import httpx

from lemonade_inferos.cli.common import handle_errors
from lemonade_inferos.controller.auth import TOKEN_ENV, read_token_file, token_file
from lemonade_inferos.controller.server import DEFAULT_PORT, port_file
from lemonade_inferos.errors import InferosError


class ControlAPIError(InferosError):
    code = "control_api_error"


def _base_url(port: int | None) -> str:
    if port is None:
        if os.environ.get("INFEROS_AGENT_PORT"):
            port = int(os.environ["INFEROS_AGENT_PORT"])
        else:
            port = _recorded_port() or DEFAULT_PORT
    return f"http://127.0.0.1:{port}/v1"


def _recorded_port() -> int | None:
    """The port the last server wrote to INFEROS_HOME/agent-port (None when missing or not a port)."""
    try:
        port = int(port_file().read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _token() -> str | None:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return read_token_file(token_file())


def call(method: str, path: str, port: int | None = None, body: Any = None) -> Any:
    url = _base_url(port) + path
    headers = {"X-Inferos-Token": _token()} if method == "POST" and _token() else {}
    try:
        response = httpx.request(method, url, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ControlAPIError(f"cannot reach the control API at {url}: {exc} "
                              "(is `lemonade-server serve --plugin inferos` running?)") from exc
    data = response.json()
    if response.status_code >= 400:
        error = data.get("error", {})
        raise ControlAPIError(f"{response.status_code} {error.get('code')}: {error.get('message')}")
    return data


def parse_assignments(assignments: tuple[str, ...]) -> dict[str, Any]:
    """``kv.mode=dynamic quality.max_delta_ppl=0.3`` -> a nested partial policy."""
    update: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE (e.g. kv.recent_window=128)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = update
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return update


port_option = click.option("--port", type=int, default=None,
                           help="Control API port (default: INFEROS_AGENT_PORT, the running server's, or 7031).")


@click.group()
def policy() -> None:
    """Read or change the running controller's policy (control API)."""


@policy.command("get")
@port_option
@handle_errors
def policy_get(port: int | None) -> None:
    """Print the current policy as JSON."""
    click.echo(json.dumps(call("GET", "/policy", port), indent=2))


@policy.command("set")
@click.argument("assignments", nargs=-1, required=True)
@port_option
@handle_errors
def policy_set(assignments: tuple[str, ...], port: int | None) -> None:
    """Merge KEY=VALUE settings into the policy, e.g. kv.mode=quality_optimized kv.recent_window=128."""
    click.echo(json.dumps(call("POST", "/policy", port, parse_assignments(assignments)), indent=2))


@click.command()
@port_option
@handle_errors
def metrics(port: int | None) -> None:
    """Print the controller's measurements (GET /v1/metrics)."""
    click.echo(json.dumps(call("GET", "/metrics", port), indent=2))


@click.command()
@click.argument("state", type=click.Choice(["on", "off"]))
@port_option
@handle_errors
def baseline(state: str, port: int | None) -> None:
    """Turn baseline mode (every optimisation off) on or off."""
    click.echo(json.dumps(call("POST", "/baseline", port, {"enable": state == "on"})))


@click.command()
@port_option
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--show-token", is_flag=True, help="Also print the control token (the page asks for it to change "
              "the policy).")
@handle_errors
def dashboard(port: int | None, open_browser: bool, show_token: bool) -> None:
    """Print the live dashboard's address (served by the running server's control API at /dashboard)."""
    url = _base_url(port).removesuffix("/v1") + "/dashboard"
    try:
        httpx.head(url, timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise ControlAPIError(f"no dashboard at {url}: {exc} (is `lemonade-server serve --plugin inferos` "
                              "running?)") from exc
    click.echo(url)
    if show_token:
        token = _token()
        if token is None:
            raise ControlAPIError(f"no control token: neither {TOKEN_ENV} nor {token_file()} holds one")
        click.echo(token)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
