"""``karma report``: the experiments' results table as Markdown and self-contained HTML."""

from __future__ import annotations

from pathlib import Path

import click

SKIP = {".git", ".dvc", ".venv", "node_modules"}


def _walk(root: Path, pattern: str) -> list[Path]:
    found: list[Path] = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in SKIP):
        if not top.name.startswith("."):
            found += top.rglob(pattern)
    return sorted(found)


@click.command("report")
@click.option(
    "--repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The DVC project.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Writes report.md and report.html here.",
)
@click.option("--workspace", is_flag=True, help="Include the uncommitted workspace as a row.")
@click.option(
    "--diff",
    "diff_rev",
    metavar="REV",
    default=None,
    help="Instead: print a PR-ready Markdown table of metric changes since REV.",
)
def command(repo: Path, out: Path, workspace: bool, diff_rev: str | None) -> None:
    """Render the paper's comparison (baseline vs kinship variants, per benchmark, per method).

    \b
    Reads every experiment of `dvc exp show` (run `dvc exp run -S kinship=sim` etc. first),
    embeds the workspace's figures (plots/**/*.png) and training curves (dvclive TSVs), and
    writes OUT/report.md and OUT/report.html (no external assets: opens offline).
    `--diff main` prints the change of every metric since `main`, ready to paste into a PR.
    """
    from karma import report
    from karma.io import write_text

    if diff_rev:
        click.echo(report.diff_markdown(report.metrics_diff(diff_rev, repo), diff_rev), nl=False)
        return
    rows = report.collect_experiments(repo, workspace=workspace)
    md = "# KARMA experiments\n\n" + report.markdown_table(rows)
    figures = _walk(repo, "*.png")
    figures = [f for f in figures if f.parts[len(repo.parts)] == "plots"]
    curves = [p for p in _walk(repo, "*.tsv") if "metrics" in p.parts and "plots" in p.parts]
    page = report.html_page(rows, figures=figures, curve_files=curves)
    write_text(out / "report.md", md)
    write_text(out / "report.html", page)
    click.echo(md, nl=False)
    click.echo(f"\nwrote {out / 'report.md'} and {out / 'report.html'} ({len(rows)} experiments)")
