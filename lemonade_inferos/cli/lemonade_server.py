"""``lemonade-server``: Lemonade's command line, served by our Python host.

    lemonade-server serve --plugin inferos
    lemonade-server run SmolLM2-135M-Instruct-CPU
    lemonade-server pull SmolLM2-135M-Instruct-CPU
    lemonade-server list | status | stop | delete MODEL

Flags have environment twins: LEMONADE_HOST, LEMONADE_PORT, LEMONADE_CTX_SIZE, LEMONADE_API_KEY.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import httpx
from rich.console import Console
from rich.table import Table

from lemonade_inferos import __version__
from lemonade_inferos.cli.common import console, handle_errors
from lemonade_inferos.host.routes import LEMONADE_API_VERSION

LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def server_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--host", default="127.0.0.1", envvar="LEMONADE_HOST", show_envvar=True, show_default=True,
                     help="Address to bind (loopback by default). Requests must name a loopback host or an IP "
                          "address in their Host header, or one listed in LEMONADE_ALLOWED_HOSTS."),
        click.option("--port", default=13305, type=click.IntRange(0, 65535), envvar="LEMONADE_PORT",
                     show_envvar=True, show_default=True, help="Port to listen on."),
        click.option("--log-level", default="info", type=click.Choice(LOG_LEVELS), envvar="LEMONADE_LOG_LEVEL",
                     show_envvar=True, show_default=True, help="Log verbosity; info includes one line per request."),
        click.option("--ctx-size", type=click.IntRange(min=16), envvar="LEMONADE_CTX_SIZE", show_envvar=True,
                     default=None, help="Context length of loaded models (default: the model's)."),
        click.option("--max-loaded-models", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Models kept in memory at once; loading another unloads the least recently used."),
        click.option("--no-tray", is_flag=True, help="Accepted for compatibility; there is no tray here."),
        click.option("--plugin", "plugins", multiple=True,
                     help="Plugin to load (repeatable), e.g. --plugin inferos. Without one: baseline og.Generator."),
        click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Requests that may wait for a busy model before HTTP 503."),
        click.option("--parallel", type=click.IntRange(min=1), default=4, envvar="LEMONADE_PARALLEL",
                     show_envvar=True, show_default=True,
                     help="Generations a model serves at once (llama-server's slots), their steps taking turns: a "
                          "new request's first token does not wait for other replies to end. 1: one after another."),
        click.option("--schedule", type=click.Choice(["fcfs", "shortest_first"]), default="fcfs", show_default=True,
                     help="Who gets a place that frees: first come first served, or the shortest prompt."),
        click.option("--prefill-budget", type=click.IntRange(min=16), default=128, show_default=True,
                     help="Most prompt tokens one step runs while other sequences of the model are running."),
        click.option("--batch-decode/--no-batch-decode", default=True, show_default=True,
                     help="Run the next token of the sequences decoding at once in one session run (continuous "
                          "batching); off: each takes a step of its own."),
        click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
                     envvar="LEMONADE_REQUEST_TIMEOUT", show_envvar=True, show_default=True,
                     help="Seconds one generation may run (queue wait and engine load not counted); a longer one ends with "
                          "HTTP 504 request_timeout (an SSE error event when streaming)."),
        click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=8.0,
                     envvar="LEMONADE_MAX_BODY_MB", show_envvar=True, show_default=True,
                     help="Largest request body in MiB; a larger one is HTTP 413 request_too_large, refused before "
                          "it is read whole or parsed."),
        click.option("--plugin-option", "plugin_option", multiple=True, metavar="NAME.KEY=VALUE",
                     help="An option for a loaded plugin (repeatable), e.g. --plugin-option inferos.kv.mode=dynamic; "
                          "--NAME-KEY VALUE is the same (--inferos-prefix-cache-mb 64). The plugin validates them; "
                          "`inferos config show` lists the inferos plugin's."),
        click.option("--extra-models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     envvar="LEMONADE_EXTRA_MODELS_DIR", show_envvar=True,
                     help="A folder of GGUF files served as extra.NAME (converted once, at their first load)."),
        click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                     help="A config file passed to every loaded plugin (inferos: the policy YAML/TOML, watched "
                          "for edits)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def _serve(model: str | None, host: str, port: int, log_level: str, ctx_size: int | None, max_loaded_models: int,
           plugins: tuple[str, ...], max_queue: int, request_timeout: float, max_body_mb: float,
           plugin_options: dict[str, dict[str, Any]], config_path: Path | None, scheduling: dict[str, Any]) -> None:
    """``scheduling``: --parallel, --schedule, --prefill-budget, --batch-decode and --extra-models-dir as given."""
    from lemonade_inferos.engine import heap
    from lemonade_inferos.host.app import create_app
    from lemonade_inferos.host.registry import ModelRegistry
    from lemonade_inferos.host.server import bind_socket, pid_file, serve
    from lemonade_inferos.host.settings import HostSettings
    from lemonade_inferos.plugins import load_plugins

    level = "DEBUG" if log_level == "trace" else log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("LEMONADE_LOG_FILE"):  # a service's log: rotated at 10 MB, 5 kept
        _log_to_file(Path(os.environ["LEMONADE_LOG_FILE"]))
    settings = HostSettings(host=host, port=port, log_level=log_level, ctx_size=ctx_size,
                            max_loaded_models=max_loaded_models, api_key=os.environ.get("LEMONADE_API_KEY") or None,
                            plugins=list(plugins), max_queue=max_queue, request_timeout_s=request_timeout,
                            max_body_mb=max_body_mb, plugin_options=plugin_options, config_path=config_path,
                            parallel=scheduling["parallel"], schedule=scheduling["schedule"],
                            prefill_chunk_budget=scheduling["prefill_budget"],
                            batch_decode=scheduling["batch_decode"],
                            extra_models_dir=scheduling.get("extra_models_dir"))
    if model:
        settings.default_model = model
    sock = bind_socket(host, port)  # first: a busy port fails now, before a build or a plugin starts
    not_limited = heap.limit_arenas()  # before any thread starts (engine/heap.py)
    if not_limited:
        logging.getLogger(__name__).info("malloc arenas not limited: %s", not_limited)
    registry = ModelRegistry(extra_models_dir=settings.extra_models_dir)
    if not registry.is_ready(settings.default_model):
        with console.status(f"building {settings.default_model} (first use, offline)") as status:
            registry.pull(settings.default_model, progress=lambda msg: (status.update(msg), console.log(msg)))
    pm, manifests = load_plugins(list(plugins), plugin_options)
    app = create_app(settings, pm, manifests)
    address = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    with pid_file(port):
        started = serve(app, sock, address, log_level, on_stop=app.state.host.generator.stop)
    if not started:
        console.print("[red]error:[/red] the server did not start (see the log above)")
        sys.exit(3)


def _log_to_file(path: Path) -> None:
    from logging.handlers import RotatingFileHandler

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(path, maxBytes=10 * 2**20, backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def plugin_options(plugins: tuple[str, ...], assignments: tuple[str, ...], extra_args: list[str],
                   config_path: Path | None) -> dict[str, dict[str, Any]]:
    """Per plugin, the options given for it: ``--plugin-option NAME.KEY=VALUE`` and ``--NAME-KEY VALUE`` (or
    ``--NAME-KEY=VALUE``), and ``--config`` for every one. The host does not interpret them.

    Raises:
        click.UsageError: an option for no plugin given with ``--plugin``, or one without a value.
    """
    out: dict[str, dict[str, Any]] = {name: ({"config": str(config_path)} if config_path else {}) for name in plugins}
    for item in assignments:
        name, _, rest = item.partition(".")
        key, equals, value = rest.partition("=")
        if name not in out or not key or not equals:
            raise click.UsageError(f"--plugin-option {item!r}: expected NAME.KEY=VALUE for a plugin given with "
                                   f"--plugin (loaded: {', '.join(plugins) or 'none'})")
        out[name][key] = value
    args = list(extra_args)
    while args:
        arg = args.pop(0)
        body, equals, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        name = next((p for p in plugins if body.startswith(f"{p}-")), None)
        if name is None:
            raise click.UsageError(f"no such option: {arg} (an option for a plugin is --plugin-option NAME.KEY=VALUE "
                                   "or --NAME-KEY VALUE, with the plugin given by --plugin NAME)")
        if not equals:
            if not args:
                raise click.UsageError(f"option {arg} needs a value")
            value = args.pop(0)
        out[name][body[len(name) + 1:].replace("-", "_")] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-v", prog_name="lemonade-server",
                      # the Lemonade version first: GAIA reads the first X.Y.Z of this line as Lemonade's version
                      message=f"%(prog)s version {LEMONADE_API_VERSION} (lemonade-inferos %(version)s)")
def cli() -> None:
    """Lemonade-compatible LLM server (Python host with plugins).

    Environment: LEMONADE_API_KEY (every API route and /metrics then need 'Authorization: Bearer KEY'),
    LEMONADE_ALLOWED_HOSTS and LEMONADE_ALLOWED_ORIGINS (comma-separated: host names and browser origins
    admitted besides loopback), LEMONADE_SERVER_PLUGINS (allow-list), INFEROS_HOME (models, caches, state).
    """


@cli.command(context_settings=PASS_THROUGH)
@server_options
@click.pass_context
@handle_errors
def serve(ctx: click.Context, host: str, port: int, log_level: str, ctx_size: int | None, max_loaded_models: int,
          no_tray: bool, plugins: tuple[str, ...], max_queue: int, request_timeout: float, max_body_mb: float,
          config_path: Path | None, plugin_option: tuple[str, ...], **scheduling: Any) -> None:
    """Start the server (default model: SmolLM2-135M-Instruct-CPU, built offline on first use).

    SIGTERM or SIGINT stop it cleanly: running generations end, state is written, exit code 0.
    """
    _serve(None, host, port, log_level, ctx_size, max_loaded_models, plugins, max_queue, request_timeout, max_body_mb,
           plugin_options(plugins, plugin_option, ctx.args, config_path), config_path, scheduling)


@cli.command(context_settings=PASS_THROUGH)
@click.argument("model")
@server_options
@click.pass_context
@handle_errors
def run(ctx: click.Context, model: str, host: str, port: int, log_level: str, ctx_size: int | None,
        max_loaded_models: int, no_tray: bool, plugins: tuple[str, ...], max_queue: int, request_timeout: float,
        max_body_mb: float, config_path: Path | None, plugin_option: tuple[str, ...], **scheduling: Any) -> None:
    """Start the server with MODEL loaded."""
    _serve(model, host, port, log_level, ctx_size, max_loaded_models, plugins, max_queue, request_timeout, max_body_mb,
           plugin_options(plugins, plugin_option, ctx.args, config_path), config_path, scheduling)


@cli.command()
@click.argument("model")
@click.option("--checkpoint", default=None,
              help="For user.* models: the onnxruntime-genai folder to register, or a GGUF file to convert once.")
@click.option("--recipe", default=None,
              help="oga-cpu (a folder's default), oga-igpu, oga-hybrid, oga-npu; llamacpp (a GGUF's default).")
@handle_errors
def pull(model: str, checkpoint: str | None, recipe: str | None) -> None:
    """Install MODEL: build a built-in model offline, or register a local folder or GGUF file as user.NAME."""
    from lemonade_inferos.host.registry import ModelRegistry

    with console.status(f"pulling {model}") as status:
        path = ModelRegistry().pull(model, checkpoint, recipe, progress=lambda m: (status.update(m), console.log(m)))
    click.echo(f"{model}: {path}")


@cli.command("list")
def list_models() -> None:
    """List models in the registry and whether they are installed."""
    from lemonade_inferos.host.registry import ModelRegistry

    registry = ModelRegistry()
    table = Table("model", "recipe", "installed", "checkpoint")
    for name, info in registry.all().items():
        table.add_row(name, info["recipe"], "yes" if registry.is_downloaded(name) else "no", str(info["checkpoint"]))
    Console().print(table)


@cli.command()
@click.option("--host", default="127.0.0.1", envvar="LEMONADE_HOST", show_envvar=True, help="Server address.")
@click.option("--port", default=13305, type=int, envvar="LEMONADE_PORT", show_envvar=True, help="Server port.")
def status(host: str, port: int) -> None:
    """Say whether a server is running on HOST:PORT, and which model it has loaded."""
    try:
        response = httpx.get(f"http://{host}:{port}/api/v1/health", timeout=5, headers=_auth_headers())
    except httpx.HTTPError:
        click.echo(f"Server is not running on {host}:{port}")
        sys.exit(1)
    if response.status_code == 401:
        click.echo(f"Server is running on {host}:{port}, but it needs an API key: set LEMONADE_API_KEY "
                   f"{'(the one set was refused)' if os.environ.get('LEMONADE_API_KEY') else 'to see its status'}")
        return
    try:
        health = response.json()
        response.raise_for_status()
    except (ValueError, httpx.HTTPStatusError):
        click.echo(f"Something answers on {host}:{port} but not as a Lemonade server "
                   f"(HTTP {response.status_code} on /api/v1/health)")
        sys.exit(1)
    click.echo(f"Server is running on {host}:{port}, version {health.get('version')}, "
               f"model loaded: {health.get('model_loaded')}, plugins: {health.get('inferos', {}).get('plugins')}")


@cli.command()
@click.option("--port", default=13305, type=int, envvar="LEMONADE_PORT", show_envvar=True, help="Server port.")
@click.option("--wait", "wait_s", default=30.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(port: int, wait_s: float) -> None:
    """Stop the server started on PORT from this machine (it finishes cleanly: state is written)."""
    from lemonade_inferos.host.server import pid_alive, pid_path, read_pid

    path = pid_path(port)
    pid = read_pid(path)
    if pid is None:
        click.echo(f"No server started by lemonade-server is running on port {port}")
        sys.exit(1)
    if not pid_alive(pid):
        path.unlink(missing_ok=True)
        click.echo(f"Server (pid {pid}) was not running; removed its stale pid file")
        return
    os.kill(pid, signal.SIGTERM if hasattr(signal, "SIGTERM") else signal.SIGINT)
    deadline = time.monotonic() + wait_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        click.echo(f"Server (pid {pid}) on port {port} is still stopping after {wait_s:g} s")
        sys.exit(1)
    click.echo(f"Stopped server (pid {pid}) on port {port}")


@cli.command()
@click.argument("model")
@handle_errors
def delete(model: str) -> None:
    """Delete MODEL's files (built-in) or its registration (user.*)."""
    from lemonade_inferos.host.registry import ModelRegistry

    ModelRegistry().delete(model)
    click.echo(f"Deleted {model}")


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("LEMONADE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
