"""The book as a reader sees it: built, then opened in headless Chromium.

The book is built with the README's command into a fresh temporary folder. Every page
is loaded from disk in Chromium (Debian's `chromium`, which `.ci/run` installs), with no
network: its DOM is dumped once MathJax has run (`--virtual-time-budget`), and the test
fails on
- maths left as raw TeX, or fewer rendered formulas than the page has (MathJax is served
  from the book itself: `_vendor/mathjax`, see book.yml), or a backslash shown inside
  rendered maths;
- a script or stylesheet loaded from another host (a CDN);
- an image, script or stylesheet whose file is not in the build;
- an internal link to a page or anchor that does not exist;
- a line of code wider than the text column, 88 characters. Printed outputs wrap at the
  column instead (`_theme/book.css`);
- a display equation wider than the text column, which the reader would have to scroll
  sideways: measured in the browser once MathJax has typeset the page (a short script
  added to a copy of each page, `MEASURE_DISPLAY_MATHS`).
Screenshots of a few pages are written to `_build/screenshots/` (CI artefacts).

Nothing here depends on timing: virtual time makes Chromium wait for the page's own
work, and the subprocess limits only stop a hung browser.
"""

import concurrent.futures
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from bs4 import BeautifulSoup

from test_style import MAX_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"
# Pages worth looking at (file name: page, window height): maths, the intro's table,
# the appendix, and the whole of chapter 3b with its timing figure. 1440 pixels is a
# laptop's width, at which the text column holds 88 characters of code. (A URL with
# an #anchor gave a blank screenshot, hence the tall window.)
SCREENSHOT_PAGES = {
    "intro.png": ("notebooks/intro.html", 1800),
    "03a_maths.png": ("notebooks/03a_multi_axis_numpy.html", 1800),
    "03b_whole_page.png": ("notebooks/03b_multi_axis_jax.html", 16000),
    "10a_maths.png": ("notebooks/10a_losses_numpy.html", 1800),
    "appendix.png": ("notebooks/appendix_release_facts.html", 1800),
}
# Added before </body> of each page's copy: once the page has loaded, MathJax has
# typeset it and its fonts are in, every display equation gets its width and the
# width of the column it sits in (CSS pixels), and <body> says that it was measured.
MEASURE_DISPLAY_MATHS = """<script>
window.addEventListener("load", () => {
  const typeset = window.MathJax && MathJax.startup ? MathJax.startup.promise : null;
  Promise.resolve(typeset).then(() => document.fonts.ready).then(() => {
    for (const maths of document.querySelectorAll("mjx-container[display]")) {
      maths.setAttribute("data-maths-width", maths.scrollWidth);
      maths.setAttribute("data-column-width", maths.parentElement.clientWidth);
    }
    document.body.setAttribute("data-maths-measured", "");
  });
});
</script>
"""
RAW_TEX = re.compile(r"\\\[|\\\]|\\\(|\\\)|\$\$|\\begin\{")
# Generous limits that only stop a hung process; they are not measurements.
BUILD_LIMIT_S = 900
PAGE_LIMIT_S = 300


def chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def run_chromium(args, profile, height=1800):
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        f"--window-size=1440,{height}",
        # wait until the page's scripts (MathJax) are done, in virtual time
        "--virtual-time-budget=30000",
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=PAGE_LIMIT_S, check=True
    )


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    "The built HTML folder, built from scratch with the README's command."
    if chromium() is None:
        pytest.skip(
            "chromium is not installed (apt-get install chromium; .ci/run does)"
        )
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), "build", ".", "--config", "book.yml", "--toc", "_toc.yml"]
        + ["--warningiserror", "--nitpick", "--keep-going", "--path-output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_LIMIT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "_build" / "html"


def page_names(html: Path):
    return sorted(p.relative_to(html).as_posix() for p in html.glob("notebooks/*.html"))


@pytest.fixture(scope="module")
def measured_book(book, tmp_path_factory):
    "A copy of the built HTML whose pages also measure their display maths."
    copy = tmp_path_factory.mktemp("measured") / "html"
    shutil.copytree(book, copy)
    for name in page_names(copy):
        page = copy / name
        text = page.read_text(encoding="utf-8")
        assert text.count("</body>") == 1, name
        page.write_text(
            text.replace("</body>", MEASURE_DISPLAY_MATHS + "</body>"), encoding="utf-8"
        )
    return copy


@pytest.fixture(scope="module")
def rendered(measured_book):
    """{page: its DOM after MathJax ran (and display maths was measured)}, for every
    page (two browsers at a time)."""

    def dump(name):
        with tempfile.TemporaryDirectory() as profile:
            url = (measured_book / name).as_uri()
            return name, run_chromium(["--dump-dom", url], profile).stdout

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(dump, page_names(measured_book)))


def soup(text):
    return BeautifulSoup(text, "html.parser")


@pytest.fixture(scope="module")
def static(book):
    "{page: its parsed HTML as built}, for every page, parsed once."
    names = page_names(book) + ["index.html", "search.html", "genindex.html"]
    return {name: soup((book / name).read_text(encoding="utf-8")) for name in names}


def local_target(page: Path, ref: str):
    "(file, anchor) that a relative URL of `page` points to, or None for another host."
    parts = urlsplit(ref)
    if parts.scheme or parts.netloc:
        return None
    target = page if parts.path == "" else (page.parent / unquote(parts.path))
    return target.resolve(), unquote(parts.fragment)


def test_every_page_was_rendered(book, rendered):
    assert len(rendered) >= 25, sorted(rendered)
    assert "notebooks/appendix_release_facts.html" in rendered
    for name, dom in rendered.items():
        assert "</html>" in dom, f"{name}: Chromium returned no page"


def test_maths_is_rendered(static, rendered):
    problems = []
    pages_with_maths = 0
    for name, dom in rendered.items():
        formulas = len(static[name].select(".math"))
        after = soup(dom)
        containers = len(after.find_all("mjx-container"))
        if formulas:
            pages_with_maths += 1
        if containers < formulas:
            problems.append(f"{name}: {formulas} formulas, {containers} rendered")
        if after.find("mjx-merror"):
            problems.append(f"{name}: MathJax reports a TeX error")
        for maths in after.find_all("mjx-container"):
            # a backslash a reader sees: TeX that MathJax left as text, e.g. `\_`
            # inside `\text{}` (MathJax's text mode knows no macros)
            text = " ".join(maths.get_text(" ").split())
            if "\\" in text:
                at = max(text.index("\\") - 40, 0)
                problems.append(
                    f"{name}: a backslash in rendered maths: …{text[at : at + 80]}…"
                )
        for tag in after(
            ["script", "style", "pre", "code", "textarea", "mjx-container"]
        ):
            tag.decompose()
        main = after.find("main") or after
        for line in main.get_text(" ").splitlines():
            if RAW_TEX.search(line):
                problems.append(f"{name}: raw TeX in the text: {line.strip()[:100]}")
    assert pages_with_maths >= 5, "expected maths on several pages"
    assert not problems, "\n".join(problems)


def test_display_maths_fits_the_column(rendered):
    "No display equation is wider than its text column at 1440 pixels (no scrolling)."
    too_wide, measured = [], 0
    for name, dom in rendered.items():
        page = soup(dom)
        assert page.body.has_attr("data-maths-measured"), f"{name}: not measured"
        for number, maths in enumerate(page.select("mjx-container[display]"), 1):
            width = int(maths["data-maths-width"])
            column = int(maths["data-column-width"])
            measured += 1
            if width > column:
                # the assistive MathML's text, enough to find the equation
                text = " ".join(maths.get_text(" ").split())[:50]
                too_wide.append(
                    f"{name}: display equation {number} is {width} px wide in a "
                    f"{column} px column: {text}"
                )
    assert measured >= 20, f"only {measured} display equations measured"
    assert not too_wide, "\n".join(too_wide)


def test_no_resource_from_another_host(static):
    found = []
    for name, page in static.items():
        for tag in page.find_all(["script", "link"]):
            ref = tag.get("src") if tag.name == "script" else tag.get("href")
            if tag.name == "link" and "stylesheet" not in (tag.get("rel") or []):
                continue
            if ref and urlsplit(ref).netloc:
                found.append(f"{name}: {tag.name} {ref}")
    assert not found, "\n".join(found)


def test_images_scripts_and_stylesheets_exist(book, static):
    missing = []
    for name in page_names(book):
        path, page = book / name, static[name]
        refs = [img.get("src") for img in page.find_all("img")]
        refs += [s.get("src") for s in page.find_all("script") if s.get("src")]
        refs += [
            link.get("href")
            for link in page.find_all("link")
            if "stylesheet" in (link.get("rel") or [])
        ]
        for ref in refs:
            if not ref or ref.startswith("data:"):
                missing.append(f"{name}: empty or inline resource {ref!r:.40}")
                continue
            target = local_target(path, ref)
            if target is not None and not target[0].is_file():
                missing.append(f"{name}: {ref}")
    assert not missing, "missing files:\n" + "\n".join(missing)


def test_internal_links_resolve(book, static):
    ids = {}

    def anchors(file: Path):
        if file not in ids:
            name = file.relative_to(book.resolve()).as_posix()
            if name in static:
                page = static[name]
            else:
                page = soup(file.read_text(encoding="utf-8"))
            ids[file] = {t.get("id") for t in page.find_all(id=True)}
            ids[file] |= {
                t.get("name") for t in page.find_all("a", attrs={"name": True})
            }
        return ids[file]

    broken, checked = [], 0
    for name in page_names(book):
        path, page = book / name, static[name]
        for a in page.find_all("a", href=True):
            target = local_target(path, a["href"])
            if target is None or a["href"].startswith(("mailto:", "javascript:")):
                continue
            file, anchor = target
            checked += 1
            if file.is_dir():
                file = file / "index.html"
            if not file.is_file():
                broken.append(f"{name}: {a['href']} (no such file)")
            elif anchor and file.suffix == ".html" and anchor not in anchors(file):
                broken.append(f"{name}: {a['href']} (no such anchor)")
    assert checked > 100
    assert not broken, "broken links:\n" + "\n".join(broken)


def code_blocks(page):
    "The <pre> of every code cell and code block, outputs excluded."
    for pre in page.find_all("pre"):
        if not pre.find_parent(class_="cell_output"):
            yield pre


def test_code_fits_the_column(book, static):
    too_wide, pages = [], 0
    for name in page_names(book):
        pages += 1
        for pre in code_blocks(static[name]):
            lines = pre.get_text().splitlines() or [""]
            widest = max(lines, key=len)
            if len(widest) > MAX_COLUMNS:
                too_wide.append(f"{name}: {len(widest)} characters: {widest[:60]}...")
    assert pages >= 15
    assert not too_wide, "\n".join(too_wide)


def test_screenshots(book):
    "Screenshots for a reader to look at; the test only checks that they were written."
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def shoot(item):
        file_name, (page, height) = item
        target = SCREENSHOTS / file_name
        target.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            run_chromium(
                [f"--screenshot={target}", (book / page).as_uri()], profile, height
            )
        return target

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        shots = list(pool.map(shoot, SCREENSHOT_PAGES.items()))
    for shot in shots:
        assert shot.is_file() and shot.stat().st_size > 10_000, shot
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
