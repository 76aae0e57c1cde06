"""``inferos service install|uninstall|status|show``: the server as a systemd user service or a Windows service."""

from __future__ import annotations

import platform
import shutil
import sys

import click

from lemonade_inferos.cli.common import console, handle_errors
from lemonade_inferos.service import NAME, ServicePlan, run, systemctl, write_files


@click.group("service")
def service_group() -> None:
    """Run lemonade-server --plugin inferos as a service (systemd user unit; NSSM or sc.exe on Windows)."""


def _windows_manager() -> str:
    return "nssm" if shutil.which("nssm") else "sc"


@service_group.command("show")
@click.option("--for", "target", type=click.Choice(["linux", "windows-nssm", "windows-sc"]), default=None,
              help="print what install would write and run there [default: this system]")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def show(target: str | None, server_args: tuple[str, ...]) -> None:
    """Print the unit file (Linux) or the service commands (Windows) without installing anything."""
    plan = ServicePlan.here(server_args)
    target = target or ("linux" if platform.system() != "Windows" else f"windows-{_windows_manager()}")
    if target == "linux":
        click.echo(f"# {plan.unit_file}\n{plan.systemd_unit()}")
    else:
        commands = plan.nssm_commands() if target == "windows-nssm" else plan.sc_commands()
        click.echo("\n".join(" ".join(part if " " not in part else f'"{part}"' for part in c) for c in commands))
    click.echo(f"# environment file (mode 0600): {plan.env_file}\n# log: {plan.log_file}")


@service_group.command("install")
@click.option("--no-enable", is_flag=True, help="write the files only (enable and start it yourself)")
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def install(no_enable: bool, server_args: tuple[str, ...]) -> None:
    """Install and start the service; extra arguments go to `lemonade-server serve --plugin inferos`."""
    plan = ServicePlan.here(server_args)
    write_files(plan)
    console.print(f"wrote {plan.env_file} (mode 0600: the control API token)")
    if platform.system() == "Windows":
        _report(run(plan.nssm_commands() if _windows_manager() == "nssm" else plan.sc_commands()))
        return
    plan.unit_file.parent.mkdir(parents=True, exist_ok=True)
    plan.unit_file.write_text(plan.systemd_unit(), encoding="utf-8")
    console.print(f"wrote {plan.unit_file}")
    if no_enable:
        console.print(f"not enabled (--no-enable): systemctl --user daemon-reload && systemctl --user enable --now {NAME}")
        return
    if shutil.which("systemctl") is None:
        _fail("systemctl is not installed: the unit is written; enable it where systemd runs, or uninstall")
    _report(run([systemctl("daemon-reload"), systemctl("enable", "--now", NAME)]))


@service_group.command("uninstall")
@handle_errors
def uninstall() -> None:
    """Stop, disable and remove the service, its unit and its environment file."""
    plan = ServicePlan.here()
    if platform.system() == "Windows":
        _report(run(plan.windows_uninstall("nssm" if _windows_manager() == "nssm" else "sc")), required=False)
    elif shutil.which("systemctl") is not None and plan.unit_file.exists():
        run([systemctl("disable", "--now", NAME)])  # a unit systemd never loaded is removed all the same
    removed = [path for path in (plan.unit_file, plan.env_file) if path.exists()]
    for path in removed:
        path.unlink()
    if removed and shutil.which("systemctl") is not None and platform.system() != "Windows":
        run([systemctl("daemon-reload")])
    console.print("removed " + (", ".join(map(str, removed)) or "nothing (not installed)"))


@service_group.command("status")
@handle_errors
def status() -> None:
    """Whether the service is installed, and what the service manager says of it."""
    plan = ServicePlan.here()
    if platform.system() == "Windows":
        _report(run([["nssm", "status", "LemonadeInferos"] if _windows_manager() == "nssm"
                     else ["sc.exe", "query", "LemonadeInferos"]]), required=False)
        return
    if not plan.unit_file.exists():
        console.print(f"not installed ({plan.unit_file} does not exist)")
        sys.exit(3)
    console.print(f"installed: {plan.unit_file}")
    if shutil.which("systemctl") is not None:
        _report(run([systemctl("status", "--no-pager", NAME)]), required=False)


def _report(done: list[tuple[list[str], int, str]], required: bool = True) -> None:
    for command, code, output in done:
        console.print(f"$ {' '.join(command)}  -> exit {code}" + (f"\n{output}" if output else ""))
    if required and done and done[-1][1] != 0:
        _fail(f"{' '.join(done[-1][0])} failed (exit {done[-1][1]}); the files are written: `inferos service "
              "uninstall` removes them")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    sys.exit(1)
