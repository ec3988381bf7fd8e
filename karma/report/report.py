"""``karma report``: the experiments' tables and figures, as Markdown and one offline page.

Reads every experiment of ``dvc exp show`` (:mod:`karma.report.collect`), builds the paper's
tables (:mod:`karma.report.tables`), writes them as Markdown (:mod:`karma.report.markdown`)
and as one self-contained HTML page (:mod:`karma.report.html`). ``karma compare`` and
``karma report --diff`` are in :mod:`karma.report.compare`; the offline ``dvc plots`` template
in :mod:`karma.report.plots`.
"""

from __future__ import annotations

from pathlib import Path

from karma.report.collect import collect_experiments, sample_loader
from karma.report.html import html_page
from karma.report.markdown import markdown_table


def render(
    repo: str | Path = ".", *, workspace: bool = False, seed: int = 0, n_boot: int = 2000
) -> tuple[str, str, int]:
    """``(markdown, html, number of experiments)`` of the project's experiments."""
    repo = Path(repo)
    rows = collect_experiments(repo, workspace=workspace)
    loader = sample_loader(repo)
    md = "# KARMA experiments\n\n" + markdown_table(rows, samples=loader, seed=seed, n_boot=n_boot)
    page = html_page(rows, repo=repo, samples=loader, seed=seed, n_boot=n_boot)
    return md, page, len(rows)
