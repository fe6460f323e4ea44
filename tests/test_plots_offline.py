"""`dvc plots show` draws every declared plot with the network cut, and asks nothing of it.

The page DVC writes with the project's template (`python -m captioning plots-template`, registered with
`dvc config --local plots.html_template`) is opened in headless Chromium:
- in a new, empty network namespace (`unshare --net`) where that is allowed, so no packet can leave the
  machine, and always with every host name unresolvable and a dead proxy (127.0.0.1:9) as a second wall;
- with a net log, from which we take the requests made on behalf of the file:// page (Chromium's own
  background requests, which the wall stops, are told apart by their network isolation key);
- with a small probe script appended to a copy of the page, which writes what was drawn (the SVG of each
  Vega chart and its line marks, each <img> and whether it loaded, the page's resource timings) into the
  DOM that `--dump-dom` prints once the page has run for 10 s of virtual time.
DVC's default page is rendered the same way as a control: it must draw no chart, and the net log must
show its CDN script requests, which proves both that the wall holds and that the request check sees.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from captioning.errors import UserError
from captioning.offline_plots import CONFIG_VALUE, TEMPLATE_PATH, render_template, write_template
from captioning.tiny_project import run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
    "--virtual-time-budget=10000",
]

# Appended to a copy of the page: reports what it drew, every 250 ms of page time (the last report wins).
PROBE = """
<pre id="probe-report"></pre>
<script>
(function () {
  function charts() {
    return Array.prototype.map.call(document.querySelectorAll("svg.marks"), function (svg) {
      var title = svg.querySelector(".role-title text");
      var lines = Array.prototype.filter.call(svg.querySelectorAll("g.mark-line path"), function (path) {
        return (path.getAttribute("d") || "").length > 1;
      });
      return {title: title ? title.textContent : null, lines: lines.length};
    });
  }
  function report() {
    document.getElementById("probe-report").textContent = JSON.stringify({
      vegaEmbed: typeof window.vegaEmbed,
      charts: charts(),
      canvases: document.querySelectorAll("canvas").length,
      images: Array.prototype.map.call(document.images, function (img) {
        return {src: img.getAttribute("src"), complete: img.complete,
                width: img.naturalWidth, height: img.naturalHeight};
      }),
      resources: performance.getEntriesByType("resource").map(function (entry) { return entry.name; })
    });
  }
  report();
  window.addEventListener("load", report);
  setInterval(report, 250);
})();
</script>
"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The headless browser; checked before the expensive `demo_run` fixture."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = ("headless Chromium is needed to render the `dvc plots show` page and is not installed: "
               "`bash scripts/setup.sh --dev` installs it as root on Debian (apt-get install chromium)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def network_cut() -> list[str]:
    """A command prefix that runs a program in a network namespace of its own (no interfaces), or []."""
    if shutil.which("unshare"):
        for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
    return []


def page_requests(netlog: Path) -> list[str]:
    """Non-local URLs the network stack was asked to fetch on behalf of a file:// page."""
    text = netlog.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short when the browser exited: close its event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        on_behalf_of = f"{params.get('network_isolation_key', '')} {params.get('site_for_cookies', '')}"
        if event["type"] == start_job and "file://" in on_behalf_of and not params["url"].startswith(LOCAL_SCHEMES):
            urls.append(params["url"])
    return urls


def render(chromium: str, page: Path, workdir: Path) -> tuple[dict, list[str]]:
    """Open a probed copy of `page` with the network cut; return (probe report, page's network requests)."""
    source = page.read_text(encoding="utf-8")
    end = source.rfind("</body>")  # the last one: the inline bundle has the string in its code too
    assert end > 0, f"{page} has no </body>"
    probed = page.with_name(f"probe-{page.name}")
    probed.write_text(source[:end] + PROBE + source[end:], encoding="utf-8")
    netlog = workdir / "netlog.json"
    result = subprocess.run(
        [*network_cut(), chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
         f"--log-net-log={netlog}", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe-report">(.*?)</pre>', result.stdout, re.S)
    assert result.returncode == 0 and found and found.group(1), (
        f"Chromium did not render {probed} (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(html.unescape(found.group(1))), page_requests(netlog)


def declared_plots(project: Path) -> tuple[dict[str, int], list[str]]:
    """From dvc.yaml: {Vega plot title: number of y series} and the image plot paths."""
    definition = yaml.safe_load((project / "dvc.yaml").read_text())
    entries = list(definition.get("plots", []))
    for stage in definition["stages"].values():
        entries += stage.get("plots", [])
    vega, images = {}, []
    for entry in entries:
        name, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            images.append(name)
        elif isinstance((props or {}).get("y"), dict):
            vega[name] = len(props["y"])
        else:
            raise AssertionError(f"plot {name!r}: a kind this test does not know how to check; extend it")
    return vega, images


def show(project: Path, out: Path) -> Path:
    run(["dvc", "plots", "show", "--out", str(out)], project)
    return out / "index.html"


@pytest.fixture(scope="module")
def pages(chromium, demo_run, tmp_path_factory):
    """DVC's default page and the page with the offline template, each rendered with the network cut."""
    root = tmp_path_factory.mktemp("plots_offline")
    default = show(demo_run, root / "default")
    first = run([sys.executable, "-m", "captioning", "plots-template"], demo_run)
    again = run([sys.executable, "-m", "captioning", "plots-template"], demo_run)
    run(["dvc", "config", "--local", "plots.html_template", CONFIG_VALUE], demo_run)
    try:
        offline = show(demo_run, root / "offline")
        ignored = run(["git", "check-ignore", "-q", str(TEMPLATE_PATH)], demo_run, check=False).returncode == 0
    finally:  # leave the shared project as the other tests expect it
        run(["dvc", "config", "--local", "--unset", "plots.html_template"], demo_run)
    (root / "chromium-default").mkdir()
    (root / "chromium-offline").mkdir()
    return {
        "project": demo_run, "generator": (first.stdout, again.stdout), "ignored": ignored,
        "default": (default, *render(chromium, default, root / "chromium-default")),
        "offline": (offline, *render(chromium, offline, root / "chromium-offline")),
    }


def test_template_keeps_dvc_placeholders_and_leaves_out_the_cdn_scripts():
    page = render_template("window.vegaEmbed = function () {};", "test")
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert page.index("window.vegaEmbed") < page.index("{plot_divs}")  # loaded before DVC's per-plot scripts
    with pytest.raises(UserError, match="plot_divs"):
        render_template("var s = '{plot_divs}';", "test")
    with pytest.raises(UserError, match="</script"):
        render_template("var s = '</SCRIPT>';", "test")


def test_template_replaces_a_file_that_is_not_utf8_instead_of_failing(tmp_path):
    """`--out` at an existing file in another encoding (or binary) ended in a UnicodeDecodeError traceback
    from the up-to-date check; the command (re)writes the template there, as it does over any other text."""
    out = tmp_path / "offline.html"
    out.write_bytes("<html>caf\xe9</html>".encode("latin-1") + bytes(range(128, 256)))
    assert write_template(out) is True
    assert "{plot_divs}" in out.read_text(encoding="utf-8")
    assert write_template(out) is False  # and idempotent from then on


@pytest.mark.slow
def test_template_generation_is_idempotent_and_git_ignored(pages):
    first, again = pages["generator"]
    assert "up to date" in again, f"second run rewrote the template: {again!r} (first: {first!r})"
    assert pages["ignored"], f"{TEMPLATE_PATH} is generated and must be git-ignored"


@pytest.mark.slow
def test_default_page_is_blank_offline_and_its_requests_are_seen(pages):
    """The control: proves the network is cut and that `page_requests` sees what a page asks for."""
    page, report, requests = pages["default"]
    cdn_scripts = re.findall(r'<script src="([^"]+)"', page.read_text(encoding="utf-8"))
    assert cdn_scripts, "DVC's default page no longer loads scripts from a URL; update this control"
    assert report["charts"] == [] and report["vegaEmbed"] == "undefined", (
        f"DVC's default page drew charts with the network cut, so the cut did not hold: {report}")
    assert set(cdn_scripts) <= set(requests), (
        f"the net log check missed the default page's CDN requests {cdn_scripts}; it saw {requests}")


@pytest.mark.slow
def test_offline_page_draws_every_plot_without_the_network(pages):
    project = pages["project"]
    page, report, requests = pages["offline"]
    vega, images = declared_plots(project)

    markup = re.sub(r"<script\b.*?</script>", "", page.read_text(encoding="utf-8"), flags=re.S | re.I)
    remote = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"'\s>]*""", markup, re.I)
    assert not remote, f"the page references remote resources: {remote}"
    assert requests == [], f"the page asked the network for {requests}"
    assert all(name.startswith(LOCAL_SCHEMES) for name in report["resources"]), report["resources"]

    drawn = {chart["title"]: chart["lines"] for chart in report["charts"]}
    assert report["vegaEmbed"] == "function", f"the bundled Vega-Embed did not load: {report}"
    for title, series in vega.items():
        assert title in drawn, f"Vega plot {title!r} did not draw (drawn: {drawn}, canvases: {report['canvases']})"
        assert drawn[title] >= series, f"Vega plot {title!r} drew {drawn[title]} line marks for {series} series"

    loaded = {}
    for img in report["images"]:
        if img["complete"] and img["width"] > 0 and not img["src"].startswith("data:"):
            loaded[(page.parent / img["src"]).read_bytes()] = (img["width"], img["height"])
    for path in images:
        data = (project / path).read_bytes()
        assert data in loaded, f"image plot {path} is not on the page as a loaded <img>: {report['images']}"
        with Image.open(project / path) as image:
            assert loaded[data] == image.size, f"{path} loaded at {loaded[data]}, the file is {image.size}"
