"""The ``inferos`` command: the plugin's own tools, one module per command group.

    inferos model build smollm2-135m --weights int4      (cli/model.py)
    inferos generate smollm2-135m "Why is the sky blue?"
    inferos bench engine --model smollm2-135m --json out/engine.json   (cli/bench.py)
    inferos eval ppl --kv dynamic@0.9                     (cli/eval.py)
    inferos policy set kv.mode=quality_optimized          (cli/control.py; also metrics, baseline, dashboard)
    inferos config show; inferos agent --config FILE      (cli/config.py)
    inferos service install|uninstall|status|show          (cli/service.py)
    inferos ab --policy a.yaml --policy b.yaml; inferos tune --workload chat   (cli/tune.py)
"""

from __future__ import annotations

import logging

import click

from lemonade_inferos import __version__
from lemonade_inferos.cli import bench, config, control, eval, model, service, tune


@click.group()
@click.version_option(__version__, prog_name="inferos")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Logging verbosity.")
def cli(log_level: str) -> None:
    """Infer-OS for Lemonade: models, benchmarks and evaluations."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")


for command in (model.model, model.generate, bench.bench, eval.eval_group, control.policy, control.metrics,
                control.baseline, control.dashboard, config.config_group, config.agent, service.service_group,
                tune.ab, tune.tune):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
