"""Running the server as a service: a systemd user unit on Linux, NSSM or ``sc.exe`` on Windows.

The unit runs ``lemonade-server serve --plugin inferos`` with the design document's restart policy (restart on
failure after 30 s; ``sc.exe``: restart after 5, 10, 30 s, the count reset daily), the control API token from an
environment file only the user can read (mode 0600; ``INFEROS_AGENT_TOKEN`` from the installer's environment,
else a new one), and the log in ``INFEROS_HOME/logs/lemonade-server.log``, rotated at 10 MB (``LEMONADE_LOG_FILE``;
NSSM rotates its own stdout/stderr files too). ``uninstall`` stops, disables and removes all of it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lemonade_inferos.durable import atomic_write
from lemonade_inferos.paths import inferos_home

NAME = "lemonade-inferos"
WINDOWS_NAME = "LemonadeInferos"
RESTART_DELAY_S = 30
LOG_ROTATE_BYTES = 10 * 2**20


@dataclass(frozen=True)
class ServicePlan:
    """Everything a service install writes or runs, derived from the environment (testable as text)."""

    command: list[str]
    home: Path
    env_file: Path
    log_file: Path
    unit_file: Path

    @classmethod
    def here(cls, extra_args: tuple[str, ...] = ()) -> "ServicePlan":
        home = inferos_home().resolve()
        server = shutil.which("lemonade-server")
        command = [server] if server else [sys.executable, "-m", "lemonade_inferos.cli.lemonade_server"]
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return cls(command + ["serve", "--plugin", "inferos", *extra_args], home, home / "service.env",
                   home / "logs" / "lemonade-server.log", config / "systemd" / "user" / f"{NAME}.service")

    def environment(self, token: str) -> str:
        return (f"INFEROS_HOME={self.home}\nINFEROS_AGENT_TOKEN={token}\nLEMONADE_LOG_FILE={self.log_file}\n")

    def systemd_unit(self) -> str:
        exec_start = " ".join(_systemd_quote(part) for part in self.command)
        return f"""[Unit]
Description=Lemonade server with the Infer-OS plugin (lemonade-inferos)
Documentation=https://lemonade-server.ai
After=network.target

[Service]
Type=simple
EnvironmentFile={self.env_file}
ExecStart={exec_start}
Restart=on-failure
RestartSec={RESTART_DELAY_S}
KillSignal=SIGTERM
TimeoutStopSec=60

[Install]
WantedBy=default.target
"""

    def nssm_commands(self) -> list[list[str]]:
        exe, *args = self.command
        name, logs = WINDOWS_NAME, self.log_file.parent
        return [["nssm", "install", name, exe, *args],
                ["nssm", "set", name, "AppDirectory", str(self.home)],
                ["nssm", "set", name, "DisplayName", "Lemonade server (Infer-OS)"],
                ["nssm", "set", name, "Description", "Lemonade-compatible LLM server with the Infer-OS plugin"],
                ["nssm", "set", name, "AppStdout", str(logs / "service_stdout.log")],
                ["nssm", "set", name, "AppStderr", str(logs / "service_stderr.log")],
                ["nssm", "set", name, "AppRotateFiles", "1"], ["nssm", "set", name, "AppRotateOnline", "1"],
                ["nssm", "set", name, "AppRotateBytes", str(LOG_ROTATE_BYTES)],
                ["nssm", "set", name, "AppExit", "Default", "Restart"],
                ["nssm", "set", name, "AppRestartDelay", str(RESTART_DELAY_S * 1000)],
                ["nssm", "set", name, "AppEnvironmentExtra", f"INFEROS_HOME={self.home}",
                 f"LEMONADE_LOG_FILE={self.log_file}", "INFEROS_AGENT_TOKEN=<from service.env>"],
                ["nssm", "start", name]]

    def sc_commands(self) -> list[list[str]]:
        binary = " ".join(f'"{part}"' if " " in part else part for part in self.command)
        return [["sc.exe", "create", WINDOWS_NAME, f"binPath= {binary}", "start= auto",
                 "DisplayName= Lemonade server (Infer-OS)"],
                ["sc.exe", "description", WINDOWS_NAME, "Lemonade-compatible LLM server with the Infer-OS plugin"],
                ["sc.exe", "failure", WINDOWS_NAME, "reset= 86400", "actions= restart/5000/restart/10000/restart/30000"],
                ["sc.exe", "start", WINDOWS_NAME]]

    def windows_uninstall(self, manager: str) -> list[list[str]]:
        if manager == "nssm":
            return [["nssm", "stop", WINDOWS_NAME], ["nssm", "remove", WINDOWS_NAME, "confirm"]]
        return [["sc.exe", "stop", WINDOWS_NAME], ["sc.exe", "delete", WINDOWS_NAME]]


def _systemd_quote(part: str) -> str:
    return f'"{part}"' if any(c in part for c in ' "\\') else part


def write_files(plan: ServicePlan, token: str | None = None) -> str:
    """The environment file (0600, before anything else can read it) and the log folder; returns the token."""
    token = token or os.environ.get("INFEROS_AGENT_TOKEN") or secrets.token_urlsafe(32)
    plan.log_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(plan.env_file, plan.environment(token), mode=0o600)
    return token


def run(commands: list[list[str]]) -> list[tuple[list[str], int, str]]:
    """Run each command; stop at the first failure. Returns (command, exit code, output) of those run."""
    done = []
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        done.append((command, result.returncode, (result.stdout + result.stderr).strip()))
        if result.returncode != 0:
            break
    return done


def systemctl(*args: str) -> list[str]:
    return ["systemctl", "--user", *args]
