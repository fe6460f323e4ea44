"""The README and docs/ link to files and sections that exist (the tuning log moved out of the README once;
a moved or renamed file must not leave dead links behind), and the README's reference tables say what the
code does: the params and their defaults, the server's limit flags, the benchmark keys, goals and figures."""
import functools
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@functools.cache  # a page is parsed once, however many links point into it
def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower-case, punctuation dropped, spaces to hyphens (a `# comment` inside
    a fenced code block is not a heading)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def local_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text(encoding="utf-8")) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page):
    links = local_links(page)
    assert links, f"{page.name} has no local links: the pattern no longer matches"
    dead = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            dead.append(link)
    assert not dead, f"{page.name}: dead links {dead}"


# The README as a contract: the tables a user acts on must say what the code does. Each test below fails
# when one side changes alone (a default, a flag, a benchmark key or goal, a measured figure).
README = PROJECT / "README.md"


def readme_table(heading_line: str) -> list[list[str]]:
    """The cells of the README table whose header row is `heading_line` (the separator row left out)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading_line)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, f"no rows under {heading_line!r}"
    return rows


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def same_value(text: str, value) -> bool:
    """Whether the README's `text` says `value` (PyYAML reads 1e-6, without a dot, as a string)."""
    parsed = yaml.safe_load(text)
    if isinstance(value, float):
        return not isinstance(parsed, bool) and float(parsed) == value
    return parsed == value


def test_params_reference_lists_every_key_with_its_default():
    defaults = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    documented = {}
    for key_cell, default_cell, _ in readme_table("| key | default | meaning |"):
        keys = re.findall(r"`([a-z_]+)\.([a-z0-9_*]+)`", key_cell)
        if keys == [("demo", "*")]:  # "1500 images, 128 px, seed 7, in `data/demo`"
            demo = defaults["demo"]
            assert default_cell == (f"{demo['n_images']} images, {demo['image_size']} px, seed {demo['seed']}, "
                                    f"in `{demo['out_dir']}`"), default_cell
            documented.update({("demo", key): None for key in demo})
            continue
        values = [unquote(v) for v in default_cell.split(", ")] if len(keys) > 1 else [unquote(default_cell)]
        assert len(values) == len(keys), key_cell
        documented.update(dict(zip(keys, values, strict=True)))
    in_file = {(section, key) for section, knobs in defaults.items() for key in knobs}
    assert set(documented) == in_file, f"README only: {set(documented) - in_file}, params.yaml only: " \
                                       f"{in_file - set(documented)}"
    wrong = {f"{s}.{k}": (v, defaults[s][k]) for (s, k), v in documented.items()
             if v is not None and not same_value(v, defaults[s][k])}
    assert not wrong, f"README default vs params.yaml: {wrong}"


def test_serve_limits_table_gives_the_flags_and_their_defaults():
    """The flags of `serve`; the fetch ones belong to the caption command too, with the same defaults."""
    from captioning.__main__ import _parser

    commands = _parser()._subparsers._group_actions[0].choices
    flags = {name: {option: action for action in commands[name]._actions for option in action.option_strings}
             for name in ("serve", "caption")}
    for flag, default, _ in readme_table("| flag | default | what |"):
        flag = unquote(flag)
        owners = ("serve", "caption") if flag.startswith(("--fetch-", "--allow-private-urls")) else ("serve",)
        for command in owners:
            action = flags[command].get(flag)
            assert action is not None, f"README's {flag} is not a flag of {command}"
            if default == "off":
                assert action.default is False, flag
            else:
                assert float(default) == action.default, f"{command} {flag}: README {default}, code {action.default}"


def bench_runner():
    spec = importlib.util.spec_from_file_location("bench_run_for_docs", PROJECT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(PROJECT / "bench"))  # run.py imports its sibling `common`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PROJECT / "bench"))
    return module


def committed_bench_results() -> dict:
    """bench/results.json, the full run the README quotes; skips when a local bench run rewrote it."""
    results_file = PROJECT / "bench" / "results.json"
    changed = subprocess.run(["git", "status", "--porcelain", "--", str(results_file)], cwd=PROJECT,
                             capture_output=True, text=True)
    if changed.returncode == 0 and changed.stdout.strip():
        # `python bench/run.py` here rewrote it: the README quotes the committed run, not this one.
        pytest.skip("bench/results.json differs from the committed one (a local bench run)")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    assert results["run"]["mode"] == "full"
    return results


def test_performance_table_matches_the_goals_and_the_committed_results():
    """Every benchmark key the README cites is one bench/run.py measures, with the same goal, and the
    figure in "measured" is bench/results.json's (the full run the README says it quotes), as rounded."""
    goals = bench_runner().GOALS
    results = committed_bench_results()
    assert f"`python bench/run.py` on {results['run']['date'][:10]}" in README.read_text(encoding="utf-8")
    rows = readme_table("| key | what | measured | goal |")
    assert sorted(unquote(row[0]) for row in rows) == sorted(goals)
    for key_cell, _, measured, goal in rows:
        key = unquote(key_cell)
        comparison, threshold = goals[key]
        stated = re.match(r"(>=|<=|<)? ?([\w.]+)", goal)
        assert (stated.group(1) or "==", yaml.safe_load(stated.group(2))) == (comparison, threshold), key
        assert goal.split(", ", 1)[1].startswith("met") == results[key]["meets_goal"], key
        value = results[key]["value"]
        shown = measured.split()[0]
        if isinstance(value, bool):
            assert yaml.safe_load(shown) is value, key
        else:
            decimals = len(shown.partition(".")[2])
            assert float(shown) == round(value, decimals), f"{key}: README {shown}, results.json {value}"
        cpu = re.search(r"CPU-time ratio ([\d.]+)", measured)
        if cpu:
            decimals = len(cpu.group(1).partition(".")[2])
            assert float(cpu.group(1)) == round(results[key]["cpu_time_value"], decimals), key


def test_serve_load_table_is_the_committed_full_run():
    """The Serve section's "Under load" figures are bench_serve's, in the committed bench/results.json."""
    results = committed_bench_results()
    throughput, errors, rss = (results[key] for key in ("serve_throughput_ratio", "serve_errors", "serve_rss_growth"))
    rows = {row[0]: row[1:] for row in readme_table("| figure | value | goal |")}
    lone = rows["lone request latency, p50 / p99"][0]
    assert lone == f"{throughput['lone_p50_ms']:.0f} / {throughput['lone_p99_ms']:.0f} ms"
    assert rows["throughput, 16 clients, vs offline extraction + decoding of the same images"][0] == (
        f"{throughput['value']:.2f}x ({throughput['server_images_per_s']:.1f} vs "
        f"{throughput['offline_images_per_s']:.1f} images/s)")
    assert rows["errors"][0] == f"{errors['value']} of {errors['requests']:,} requests"
    assert rows["server's peak RSS after all requests vs after 100"][0] == (
        f"{rss['value']:.2f} ({rss['peak_rss_mb_early']:.0f} -> {rss['peak_rss_mb_total']:.0f} MB)")


def test_docs_pages_quote_no_benchmark_speeds():
    """A bench run rewrites bench/results.json, and the README's Performance table is checked against it
    above; a speed copied into docs/ is checked by nothing and goes stale (the tuning log said 41.8 and
    75.0 photos/s for EfficientNet-Lite0 long after the benchmark measured 118.8 and 202.9). docs/ names the
    benchmark keys instead."""
    speed = re.compile(r"\d[\d.,]*\s*(?:photos|images|captions)(?:/s| per second)")
    quoted = {page.name: speed.findall(page.read_text(encoding="utf-8")) for page in PAGES if page != README}
    assert not any(quoted.values()), f"speeds copied into docs/ (name the bench/results.json key instead): {quoted}"


def readme_quote(pattern: str) -> str:
    """The one text of the README that `pattern`'s group matches (the README's line breaks read as spaces)."""
    found = re.findall(pattern, " ".join(README.read_text(encoding="utf-8").split()))
    assert len(found) == 1, f"{pattern!r} matches {len(found)} times in the README"
    return found[0]


def test_the_errors_the_readme_quotes_are_the_codes(tmp_path, monkeypatch):
    """A message the README quotes is the one a user gets: it quoted "not an existing weights file", which no
    message says. The misspelt key's message is the one of its sentence on what names a line of params.yaml."""
    from captioning.errors import UserError
    from captioning.params import BadValue, backbone_weights, read_section

    with pytest.raises(BadValue) as weights:
        backbone_weights("weights/mine.weights.h5")  # the file a queued `dvc exp run` left behind
    assert readme_quote(r'the queued run stops with "([^"]+)"') in str(weights.value)

    params = (PROJECT / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(params.replace("\n  epochs:", "\n  epoch:", 1), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as misspelt:
        read_section("train")
    assert str(misspelt.value).startswith(readme_quote(r"\(`(params\.yaml has unknown keys: [^`]+?); \.\.\.`\)"))


def test_troubleshooting_names_messages_the_package_prints():
    """Troubleshooting is found by the words of an error: each message it names in backticks (a path before
    it and `...` after it left out) is text of the package, so a reworded message cannot strand its entry."""
    section = README.read_text(encoding="utf-8").split("\n## Troubleshooting\n", 1)[1]
    quoted = re.findall(r"\*\*`([^`]+)`\*\*|`([^`]+?) ?\.\.\.`", section)
    messages = [re.sub(r"^\S+/\S+ ", "", bold or cut) for bold, cut in quoted]  # "data/decode.json belongs ..."
    assert len(messages) >= 3, messages
    source = "\n".join(path.read_text(encoding="utf-8") for path in (PROJECT / "captioning").rglob("*.py"))
    assert not [message for message in messages if message not in source], messages


def test_the_readme_rehearsal_script_draws_official_format_lists(flickr8k, tmp_path):
    """The README's script for the rehearsals of the official test split runs as printed (the data path
    aside) and writes lists `data.split_dir` accepts: 125 test photos of the official train photos that are
    here, the rest of the official train list as train, the official dev list, no photo in two lists."""
    from captioning.split import official_split

    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    script = [block for block in blocks if "default_rng(2027)" in block]
    assert len(script) == 1, "the README's rehearsal script is gone or printed twice"
    assert 'Path("/data/flickr8k")' in script[0]
    (tmp_path / "draw.py").write_text(script[0].replace('Path("/data/flickr8k")', f"Path({str(flickr8k)!r})"))
    subprocess.run([sys.executable, "draw.py"], cwd=tmp_path, check=True, timeout=60)

    official_train = (flickr8k / "Flickr_8k.trainImages.txt").read_text().split()
    here = sorted(path.name for path in (flickr8k / "Images").iterdir())
    splits, report = official_split(tmp_path / "rehearsal", here)
    assert len(splits["test"]) == report["test"]["listed"] == 125
    assert set(splits["test"]) <= set(official_train)
    assert set(splits["train"]) == set(official_train) & set(here) - set(splits["test"])
    assert (tmp_path / "rehearsal" / "Flickr_8k.devImages.txt").read_bytes() == \
        (flickr8k / "Flickr_8k.devImages.txt").read_bytes()
