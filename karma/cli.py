"""The ``karma`` command: one sub-command per pipeline stage, plus ``report`` and ``params``.

Stage commands are generated from their :class:`karma.core.stage.Stage` (so they take exactly the
settings the DVC stage reads, with the same defaults) and load lazily, so ``karma --help`` stays
fast. Bad input raises :class:`karma.core.errors.KarmaError`; here, and only here, it becomes one
line on stderr and a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path

import click

from karma.command import finish_process, load_stage, make_command, run_click, setup_logging
from karma.core.errors import did_you_mean
from karma.registry import commands

#: Stage commands, from the registry: name -> (stage ref, short help).
STAGES: dict[str, tuple[str, str]] = commands()
OTHER = {
    "report": "The paper's tables of the experiments, as Markdown and one offline HTML page.",
    "params": "Print the default params.yaml (every setting with its help).",
    "dvc-yaml": "Print dvc.yaml as the stage registry generates it (--write: write it).",
    "compare": "Paired differences between two experiments' policies, as Markdown for a PR.",
}


class LazyGroup(click.Group):
    """A click group whose stage commands are built on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*STAGES, *OTHER]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in OTHER:
            return super().get_command(ctx, cmd_name)
        if cmd_name not in STAGES:
            return None

        ref, short = STAGES[cmd_name]
        return make_command(load_stage(ref), cmd_name, short, settings=True)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in STAGES and name not in OTHER:
            ctx.fail(f"no such command {name!r}{did_you_mean(name, [*STAGES, *OTHER])}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Pipeline stages (same settings as params.yaml)"):
            formatter.write_dl([(k, v[1]) for k, v in STAGES.items()])
        with formatter.section("Other commands"):
            formatter.write_dl(list(OTHER.items()))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="karma-align")
def cli(verbose: bool) -> None:
    """KARMA: kinship-aware preference data and MAP selection for LLM alignment.

    \b
    Every stage of `dvc repro` is a command here, with the same settings:
      karma kinship --scores data/origin/scores.csv --out out/kinship
      karma preferences --kinship-dir out/kinship --out out/prefs --kinship sim
      karma select --pairs out/prefs/pairs.parquet --model models/base --out out/sel \\
          --method map --ratio 0.4
    `--params params.yaml` reads the pipeline's settings; flags and -S KEY=VALUE override them.
    """
    setup_logging(verbose)


@cli.command("params", help=OTHER["params"])
def params_command() -> None:
    """Print the defaults as a commented params.yaml (how the committed one was written)."""
    from karma.params import defaults_yaml

    click.echo(defaults_yaml(), nl=False)


@cli.command("dvc-yaml", help=OTHER["dvc-yaml"])
@click.option("--write", is_flag=True, help="write dvc.yaml and stages/*.py instead of printing")
def dvc_yaml_command(write: bool) -> None:
    from karma import dvcyaml

    if write:
        for path in dvcyaml.write():
            click.echo(f"wrote {path}")
    else:
        click.echo(dvcyaml.render(), nl=False)


@cli.command("report", short_help=OTHER["report"])
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="The DVC project.")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Writes report.md and report.html here.")  # fmt: skip
@click.option("--workspace", is_flag=True, help="Include the uncommitted workspace as a row.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the paired bootstrap intervals.")  # fmt: skip
@click.option("--n-boot", type=click.IntRange(100), default=2000, show_default=True,
              help="Bootstrap resamples per comparison.")  # fmt: skip
@click.option("--diff", "diff_rev", metavar="REV", default=None,
              help="Instead: print a PR-ready table of metric changes since REV.")  # fmt: skip
@click.option("--plots-template", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Instead: write a template for an offline `dvc plots show`.")  # fmt: skip
@click.option("--vega-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="With --plots-template: folder with vega, vega-lite and "
              "vega-embed (*.min.js or `npm pack` tarballs); default: npm pack, once.")  # fmt: skip
def report_command(repo: Path, out: Path, workspace: bool, seed: int, n_boot: int,
                   diff_rev: str | None, plots_template: Path | None,
                   vega_dir: Path | None) -> None:  # fmt: skip
    """Render the paper's tables: per base model x method, pooled over bases (Table 2), the
    untrained base and the RLAIF baseline in view, intervals and significance on every cell.

    \b
    Reads every experiment of `dvc exp show` (run `dvc exp run -S kinship=sim` etc. first) and
    their per-sample results (DVC cache) for paired intervals; runs that differ only in `seed`
    are replicates (mean ± sd). Embeds Fig. 5/6-style figures, the kinship figures and the
    training curves, says which are missing and why, and writes OUT/report.md and
    OUT/report.html (one file, no external assets: opens offline).
    `--diff main` prints the change of every metric since `main`, ready to paste into a PR.
    `--plots-template FILE` writes a template with vega inlined: `dvc plots show
    --html-template FILE` then needs no CDN.
    """
    from karma.report import report

    if diff_rev:
        from karma.report.compare import diff_markdown, metrics_diff

        click.echo(diff_markdown(metrics_diff(diff_rev, repo), diff_rev), nl=False)
        return
    if plots_template:
        from karma.report.plots import plots_template as template

        _write_owned(plots_template, template(vega_dir), "--plots-template")
        click.echo(f"wrote {plots_template}: dvc plots show --html-template {plots_template}")
        return
    for name in ("report.md", "report.html"):  # before the (slow) rendering
        _check_owned(out / name, "--out")
    md, page, n = report.render(repo, workspace=workspace, seed=seed, n_boot=n_boot)
    _write_owned(out / "report.md", md, "--out")
    _write_owned(out / "report.html", page, "--out")
    click.echo(md, nl=False)
    click.echo(f"\nwrote {out / 'report.md'} and {out / 'report.html'} ({n} experiments)")


@cli.command("compare", short_help=OTHER["compare"])
@click.argument("a")
@click.argument("b")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="The DVC project.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the bootstrap intervals.")  # fmt: skip
@click.option("--n-boot", type=click.IntRange(100), default=2000, show_default=True,
              help="Bootstrap resamples per comparison.")  # fmt: skip
def compare_command(a: str, b: str, repo: Path, seed: int, n_boot: int) -> None:
    """Compare experiment B with experiment A (names from `dvc exp show`, or git revisions;
    `workspace` for the workspace): per benchmark the paired difference of the two policies on
    the same items, with its interval and the test's p (Holm-adjusted across benchmarks), the
    paper's Total, the held-out metrics and every headline number that changed. Markdown."""
    from karma.report.compare import compare_markdown

    click.echo(compare_markdown(repo, a, b, seed=seed, n_boot=n_boot), nl=False)


def _check_owned(path: Path, flag: str) -> None:
    """Refuse to overwrite a file karma did not write (a link: its target)."""
    from karma.core.errors import KarmaError
    from karma.core.io import was_written

    target = path.resolve() if path.is_symlink() else path
    if target.is_dir() or (target.exists() and not was_written(target)):
        raise KarmaError("exists and was not written by karma; move it away or choose another "
                         "path", file=path, field=flag)  # fmt: skip


def _write_owned(path: Path, text: str, flag: str) -> None:
    """Write ``text`` atomically (a symlink: into its target) and record that karma wrote it."""
    from karma.core.io import atomic_file, record_written

    _check_owned(path, flag)
    target = path.resolve() if path.is_symlink() else path
    with atomic_file(target) as tmp:
        Path(tmp).write_text(text, encoding="utf8")
    record_written(target)


def main(argv: list[str] | None = None) -> None:
    """Run the ``karma`` command line (``argv``: the arguments; None: the process's)."""
    run_click(cli, argv, prog="karma")


def console_main() -> None:
    """Entry point of the ``karma`` console script and of ``python -m karma.cli``: :func:`main`,
    then the process ends (:func:`~karma.command.finish_process`)."""
    main()
    finish_process()


if __name__ == "__main__":
    console_main()
