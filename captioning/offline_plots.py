"""An HTML template for `dvc plots show` that works offline.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network every chart
is blank. This module writes a page template with the three libraries inline, taken from the pinned
`vl-convert-python` wheel (its `javascript_bundle()` is a plain-script bundle that sets
`window.vegaEmbed`, `window.vega` and `window.vegaLite`), so the page needs nothing but itself and the
PNGs beside it. DVC uses it once `dvc config --local plots.html_template plots/offline.html` points at it
(a relative path there is taken from `.dvc/`); `scripts/setup.sh` does both.

The template leaves out DVC's `{scripts}` placeholder on purpose: that is where DVC would put the CDN
`<script src=...>` tags.
"""
from __future__ import annotations

from pathlib import Path

from captioning.errors import UserError
from captioning.files import write_text

TEMPLATE_PATH = Path(".dvc/plots/offline.html")  # generated at set-up time; git-ignored
CONFIG_VALUE = "plots/offline.html"  # the same file as `plots.html_template` sees it: relative to .dvc/
# DVC's own line templates declare the Vega-Lite v5 schema; a v5 compiler keeps vega-embed from warning.
VEGA_LITE_VERSION = "5.21"
# DVC fills these by plain text replacement, so the bundle must not contain them (nor close the tag).
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <meta name="generator" content="{generator}">
    <script type="text/javascript">
(function () {
{bundle}
})();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def vega_bundle(vl_version: str = VEGA_LITE_VERSION) -> tuple[str, str]:
    """Return (JavaScript of Vega + Vega-Lite + Vega-Embed, a line naming their versions)."""
    try:
        import vl_convert
    except ImportError as err:
        raise UserError("the offline plots template needs the vl-convert-python package "
                        "(pinned in requirements.txt): run scripts/setup.sh, or "
                        "`pip install -r requirements.txt` in the project's environment") from err
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    versions = (f"vl-convert {getattr(vl_convert, '__version__', '?')}: vega {vl_convert.get_vega_version()}, "
                f"vega-lite {vl_version}, vega-embed {vl_convert.get_vega_embed_version()}")
    return bundle, versions


def render_template(bundle: str, generator: str) -> str:
    """The page template: `bundle` inline in <head>, DVC's `{plot_divs}` (and `{refresh_tag}`) kept."""
    clashes = [text for text in (*DVC_PLACEHOLDERS, "</script") if text in bundle.lower()]
    if clashes:
        raise UserError(f"the Vega bundle contains {', '.join(clashes)}, which would break DVC's template; "
                        f"pin another vl-convert-python version")
    # The function wrapper keeps the bundle's top-level names (`t`, `n`, ...) out of the global scope,
    # where they could clash with the `var spec` of DVC's per-plot scripts; the bundle exports via `window`.
    # str.replace, not str.format: the page's CSS braces and DVC's placeholders must stay as they are.
    return PAGE.replace("{generator}", generator).replace("{bundle}", bundle)


def write_template(path: Path = TEMPLATE_PATH, vl_version: str = VEGA_LITE_VERSION) -> bool:
    """Write the template to `path` unless it already holds exactly that text; return whether it changed."""
    text = render_template(*vega_bundle(vl_version))
    path = Path(path)
    # Bytes, not read_text(): whatever else the file holds (not UTF-8, say) is simply rewritten, not a traceback.
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    write_text(path, text)
    return True
