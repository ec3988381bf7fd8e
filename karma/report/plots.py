"""``dvc plots show`` offline: an HTML template with vega, vega-lite and vega-embed inlined.

dvc's template loads them from a CDN, so ``dvc plots show`` draws empty charts without network.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

from karma.core.errors import KarmaError

log = logging.getLogger(__name__)

#: The versions dvc-render loads from a CDN (its VegaRenderer.SCRIPTS), as npm packages.
VEGA_PACKAGES = [("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")]


def vega_scripts(js_dir: Path | None = None) -> list[tuple[str, str]]:
    """``[(package@version, JS)]`` of vega, vega-lite and vega-embed, read from ``js_dir``.

    ``js_dir`` holds ``<pkg>.min.js`` files or the tarballs of ``npm pack <pkg>@<version>``.
    Without it: ``$KARMA_CACHE_DIR/vega``, filled once by ``npm pack`` from the npm registry.
    """
    from karma.core.io import cache_root

    folder = js_dir or cache_root("vega")
    specs = [f"{p}@{v}" for p, v in VEGA_PACKAGES]
    if js_dir is None and not all(_find_js(folder, p, v) for p, v in VEGA_PACKAGES):
        if shutil.which("npm") is None:
            files = ", ".join(p + ".min.js" for p, _ in VEGA_PACKAGES)
            raise KarmaError(
                f"vega JS not in {folder} and no npm to fetch it: pass --vega-dir with {files}"
            )
        folder.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with npm pack into %s", " ".join(specs), folder)
        done = subprocess.run(
            ["npm", "pack", "--silent", *specs],
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise KarmaError(f"npm pack {' '.join(specs)} failed: {last}")
    out = []
    for pkg, version in VEGA_PACKAGES:
        js = _find_js(folder, pkg, version)
        if js is None:
            why = f"no {pkg}.min.js nor {pkg}-{version}.tgz (`npm pack {pkg}@{version}`) here"
            raise KarmaError(why, file=folder)
        out.append((f"{pkg}@{version}", js))
    return out


def _find_js(folder: Path, pkg: str, version: str) -> str | None:
    plain = folder / f"{pkg}.min.js"
    if plain.is_file():
        return plain.read_text(encoding="utf8")
    tgz = folder / f"{pkg}-{version}.tgz"
    if tgz.is_file():
        with tarfile.open(tgz) as tar:
            member = tar.extractfile(f"package/build/{pkg}.min.js")
            return member.read().decode("utf8") if member else None
    return None


def plots_template(js_dir: Path | None = None) -> str:
    """An HTML template for ``dvc plots show --html-template`` with vega inlined (no CDN).

    It has no ``{scripts}`` placeholder, so dvc adds no CDN ``<script src>``; the inline
    vega, vega-lite and vega-embed define the globals dvc's plot divs call.
    """
    scripts = []
    for name, js in vega_scripts(js_dir):
        safe = js.replace("</script", "<\\/script")
        scripts.append(f"<script>/* {name} (BSD-3-Clause) */\n{safe}\n</script>")
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n{refresh_tag}\n"
        "<title>DVC plots (offline)</title>\n"
        + "\n".join(scripts)
        + "\n<style>table{border-spacing:15px}body{font-family:system-ui,sans-serif}</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )
