"""The ``karma`` command. Sub-commands load lazily so ``karma --help`` stays fast.

Each sub-command lives in ``karma/commands/<name>.py`` as a click command called ``command``.
Bad input raises :class:`karma.errors.KarmaError`; here, and only here (and in
:func:`run_stage` for the DVC stage scripts), it becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from karma.errors import KarmaError

COMMANDS: dict[str, str] = {
    "kinship": "Kinship matrix, S_pref and global kin pairs from a benchmark table.",
    "preferences": "Materialise a preference dataset (KARMA pairing or the RLAIF baseline).",
    "base-model": "Build the base model directory (hub id, local dir or the embedded GGUF).",
    "select": "Select preference pairs by alignment potential (MAP).",
    "train": "Train a policy with TRL (DPO or SFT).",
    "benchmark": "Benchmark one model with lm-eval and write a flat score row.",
    "evaluate": "Evaluate base and policy with lm-eval; write flat metrics.",
    "report": "Render the experiments' comparison as Markdown and self-contained HTML.",
}


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; INFO by default, DEBUG with ``-v`` or ``KARMA_DEBUG=1``."""
    level = logging.DEBUG if verbose or os.environ.get("KARMA_DEBUG") else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"karma.commands.{cmd_name.replace('-', '_')}")
        return module.command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, COMMANDS, n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(sorted(COMMANDS.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="karma-align")
def cli(verbose: bool) -> None:
    """KARMA: kinship-aware preference data and MAP selection for LLM alignment.

    \b
    Typical use outside DVC:
      karma kinship data/origin/scores.csv --out out/kinship
      karma preferences --scores data/origin/scores.csv \\
          --dataset data/demo/ultrafeedback_demo.jsonl --kinship sim --out pairs.parquet
    Inside DVC, `dvc repro` runs the same code through stages/*.py.
    """
    setup_logging(verbose)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning :class:`KarmaError` into one line and exit code 1."""
    try:
        cli.main(args=argv, prog_name="karma", standalone_mode=False)
    except KarmaError as err:
        click.echo(f"karma: error: {err}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("karma: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


def run_stage(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a DVC stage body with the CLI's logging and error contract."""
    setup_logging()
    try:
        fn(*args, **kwargs)
    except KarmaError as err:
        print(f"karma: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
