"""The captioning server as users meet it: a real uvicorn process on a free loopback port, real HTTP
requests, image URLs on a local HTTP server, and the page in headless Chromium (Playwright)."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pandas as pd
import pytest
from PIL import Image

from captioning.tiny_project import PROJECT, run, tool_env

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
HEIC_PHOTO = Path(__file__).parent / "fixtures/heic/rotated.heic"  # an iPhone's, see make_fixtures.py there
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images_site(demo_run, tmp_path_factory):
    """A local HTTP server holding copies of the demo images and a text file (for the URL cases)."""
    folder = tmp_path_factory.mktemp("site")
    shutil.copytree(demo_run / "data/demo/images", folder, dirs_exist_ok=True)
    (folder / "notes.txt").write_text("not an image")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    httpd.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(demo_run):
    """`python -m captioning serve` as the README starts it, on any free port; stopped by SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "captioning", "serve", "--port", "0", "--allow-private-urls", "--max-files", "3",
         "--max-pixels", "1000000", "--max-body-mb", "1", "--max-wait-ms", "20"],
        cwd=demo_run, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # printed once the model is loaded and the port is bound
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        process.kill()
        pytest.fail(f"the server did not start: {line}{process.stderr.read()}")
    address = f"http://127.0.0.1:{match.group(1)}"
    yield address, process
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def test_images(demo_run) -> pd.DataFrame:
    return pd.read_parquet(demo_run / "data/predictions.parquet").head(4)


def post_files(address: str, paths: list[Path], **fields) -> httpx.Response:
    files = [("image", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
    return httpx.post(f"{address}/caption", files=files, data=fields, timeout=60)


def test_health_names_the_model(server, demo_run):
    answer = httpx.get(f"{server[0]}/health", timeout=10).json()
    assert answer["status"] == "ok"
    backbone = json.loads((demo_run / "data/model/backbone.json").read_text())
    assert answer["model"]["backbone"] == backbone


def test_gives_evaluates_caption_alone_and_in_one_request(server, demo_run, test_images):
    paths = [demo_run / "data/demo/images" / name for name in test_images["image"]]
    for path, expected in zip(paths, test_images["generated"], strict=True):
        answer = post_files(server[0], [path]).json()
        (image,) = answer["images"]
        assert image["caption"] == expected
        assert image["caption"] in [beam["caption"] for beam in image["beams"]]
        scores = [beam["score"] for beam in image["beams"]]
        assert scores == sorted(scores, reverse=True) and len(scores) <= answer["decode"]["beam_size"]
    together = post_files(server[0], paths[:3]).json()
    assert [image["caption"] for image in together["images"]] == list(test_images["generated"][:3])


def test_a_url_gets_the_same_caption_as_the_upload(server, images_site, test_images):
    name, expected = test_images["image"].iloc[0], test_images["generated"].iloc[0]
    answer = httpx.post(f"{server[0]}/caption", json={"url": f"{images_site}/{name}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"][0]["caption"] == expected


def test_per_request_decode_settings_within_limits(server, demo_run, test_images):
    path = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    greedy = post_files(server[0], [path], beam_size="1").json()
    assert greedy["decode"]["method"] == "greedy" and len(greedy["images"][0]["beams"]) == 1
    wide = post_files(server[0], [path], beam_size="5").json()
    assert wide["decode"]["beam_size"] == 5 and 1 <= len(wide["images"][0]["beams"]) <= 5


def text_form(*fields: tuple[str, str]) -> dict:
    """httpx.post's arguments for a multipart form of text fields alone (httpx sends those urlencoded)."""
    parts = [f'--x\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields]
    return {"content": "".join(parts) + "--x--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}


def bad_requests(address: str, images_site: str, image: Path) -> dict:
    url = f"{address}/caption"
    jpeg = image.read_bytes()
    return {
        "not an image": (422, httpx.post(url, files={"image": ("a.jpg", b"just text", "image/jpeg")})),
        "empty file": (422, httpx.post(url, files={"image": ("a.jpg", b"", "image/jpeg")})),
        "too many pixels": (413, httpx.post(url, files={"image": ("big.png", png(2000, 1000), "image/png")})),
        "body too large": (413, httpx.post(url, files={"image": ("a.jpg", os.urandom(2 * 2**20), "image/jpeg")})),
        "too many files": (400, httpx.post(url, files=[("image", (f"{n}.jpg", jpeg, "image/jpeg")) for n in range(4)])),
        "no image": (400, httpx.post(url, **text_form(("beam_size", "3")))),
        "text in the image field": (400, httpx.post(url, **text_form(("image", "hello")))),
        "beam too wide": (400, httpx.post(url, files={"image": ("a.jpg", jpeg)}, data={"beam_size": "99"})),
        "beam not a number": (400, httpx.post(url, files={"image": ("a.jpg", jpeg)}, data={"beam_size": "wide"})),
        # int() read these as 10 and 3
        "beam with an underscore": (400, httpx.post(url, files={"image": ("a.jpg", jpeg)}, data={"beam_size": "1_0"})),
        "beam in Arabic-Indic digits": (400, httpx.post(url, json={"url": f"{images_site}/missing.jpg",
                                                                    "beam_size": "\u0663"})),
        "beam_size as a file": (400, httpx.post(url, files={"image": ("a.jpg", jpeg), "beam_size": ("b" * 300, b"3")})),
        "method as a file": (400, httpx.post(url, files={"image": ("a.jpg", jpeg), "method": ("m" * 300, b"beam")})),
        "unknown method": (400, httpx.post(url, files={"image": ("a.jpg", jpeg)}, data={"method": "sample"})),
        "bad JSON": (400, httpx.post(url, content=b"{\"url\": ", headers={"Content-Type": "application/json"})),
        "JSON nested too deep": (400, httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000,
                                                 headers={"Content-Type": "application/json"})),
        "URL with a broken IDNA name": (400, httpx.post(url, json={"url": "http://xn--/a.jpg"})),
        # percent-encoded by httpx and looked up in DNS as "a%20b": a 422, "cannot resolve host"
        "URL with a space in its host": (400, httpx.post(url, json={"url": "http://a b/a.jpg"})),
        "JSON without url": (400, httpx.post(url, json={"link": "x"})),
        "JSON with the url twice": (400, httpx.post(url, headers={"Content-Type": "application/json"},
                                                    content=f'{{"url": "{images_site}/a", "url": "{images_site}/b"}}')),
        "other content type": (415, httpx.post(url, content=b"x", headers={"Content-Type": "text/plain"})),
        "URL not an image": (422, httpx.post(url, json={"url": f"{images_site}/notes.txt"})),
        "URL not found": (422, httpx.post(url, json={"url": f"{images_site}/missing.jpg"})),
        "URL unreachable": (422, httpx.post(url, json={"url": "http://127.0.0.1:9/a.jpg"})),
        "URL scheme": (400, httpx.post(url, json={"url": "file:///etc/passwd"})),
        "URL port out of range": (400, httpx.post(url, json={"url": "http://127.0.0.1:99999/a.jpg"})),
        # refused for the request itself, whatever the URL would give (here a 404, a 422)
        "URL with a bad beam_size": (400, httpx.post(url, json={"url": f"{images_site}/missing.jpg", "beam_size": 99})),
        "two URLs in a form": (400, httpx.post(url, **text_form(*[("url", f"{images_site}/{image.name}")] * 2))),
        "files and a URL, one too many": (400, httpx.post(url, data={"url": f"{images_site}/missing.jpg"}, files=[
            ("image", (f"{n}.jpg", jpeg, "image/jpeg")) for n in range(3)])),
        # an echoed URL, file name or value is clipped: the errors quoted them whole, up to 64 KB and more
        "long URL, bad scheme": (400, httpx.post(url, json={"url": "ftp://x/" + "a" * 65_000})),
        "long scheme": (400, httpx.post(url, json={"url": "a" * 65_000 + "://x/a.jpg"})),
        "long URL, not found": (422, httpx.post(url, json={"url": f"{images_site}/{'a' * 60_000}.jpg"})),
        "long URL, unreachable": (422, httpx.post(url, json={"url": "http://127.0.0.1:9/" + "a" * 65_000})),
        "long URL, not an image": (422, httpx.post(url, json={"url": f"{images_site}/notes.txt?{'a' * 60_000}"})),
        "long file name, not an image": (422, httpx.post(url, files={"image": ("a" * 1000, b"text", "image/jpeg")})),
        "long beam_size": (400, httpx.post(url, files={"image": ("a.jpg", jpeg)}, data={"beam_size": "w" * 100_000})),
        "long method": (400, httpx.post(url, json={"url": f"{images_site}/{image.name}", "method": "m" * 100_000})),
        "wrong method": (405, httpx.get(url)),
        "no such page": (404, httpx.get(f"{address}/nothing")),
    }


def test_bad_input_is_a_clear_json_error(server, images_site, demo_run, test_images):
    image = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    for case, (status, response) in bad_requests(server[0], images_site, image).items():
        assert response.status_code == status, (case, response.status_code, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) and 0 < len(error) < 400 and "\n" not in error, case
        assert "Traceback" not in response.text, case


def test_an_unknown_field_is_named_with_the_accepted_ones(server, demo_run, test_images, held_url):
    """A misspelt option ("beam": 5 for beam_size) was ignored without a word: the request was captioned with
    the model's own settings."""
    url, asked, _ = held_url
    jpeg = (demo_run / "data/demo/images" / test_images["image"].iloc[0]).read_bytes()
    answers = {"JSON": httpx.post(f"{server[0]}/caption", json={"url": url, "beam": 5}, timeout=60),
               "form": httpx.post(f"{server[0]}/caption", files={"image": ("a.jpg", jpeg)}, data={"beam": "5"},
                                  timeout=60)}
    for kind, answer in answers.items():
        assert answer.status_code == 400, (kind, answer.text)
        error = answer.json()["error"]
        assert "'beam'" in error and all(name in error for name in ("url", "beam_size", "method")), (kind, error)
    assert "image" in answers["form"].json()["error"]
    assert not asked.is_set()  # refused before its URL was fetched


def test_a_query_string_on_caption_is_refused_with_the_fields_to_send(server, demo_run, test_images):
    """`POST /caption?beam_size=5&method=beam` was answered 200, decoded with the model's own settings: the query
    string was ignored without a word."""
    jpeg = (demo_run / "data/demo/images" / test_images["image"].iloc[0]).read_bytes()
    answer = httpx.post(f"{server[0]}/caption?beam_size=5&method=beam", files={"image": ("a.jpg", jpeg)}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "query string" in error and "'beam_size', 'method'" in error and "form fields or JSON keys" in error, error


def test_a_compressed_body_is_a_415_that_says_so(server):
    """A gzip-compressed JSON body got "the body is not valid JSON", a compressed upload a multipart error."""
    body = gzip.compress(json.dumps({"url": "http://127.0.0.1:9/a.jpg"}).encode())
    answer = httpx.post(f"{server[0]}/caption", content=body, timeout=60,
                        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status_code == 415 and answer.headers["accept-encoding"] == "identity", answer.text
    assert "Content-Encoding: gzip" in answer.json()["error"] and "uncompressed" in answer.json()["error"]


def test_a_multipart_body_cut_off_before_its_end_is_refused(server, demo_run, test_images):
    """A body that stopped halfway (a client or proxy that cut it) parsed without an error: the image it cut into
    was dropped without a word and the others were captioned (or the answer was "no image")."""
    jpeg = (demo_run / "data/demo/images" / test_images["image"].iloc[0]).read_bytes()

    def part(name: str) -> bytes:
        return (b'--x\r\nContent-Disposition: form-data; name="image"; filename="%s"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n" % name.encode() + jpeg)
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    whole = httpx.post(f"{server[0]}/caption", content=part("a.jpg") + b"\r\n" + part("b.jpg") + b"\r\n--x--\r\n",
                       headers=headers, timeout=60)
    assert whole.status_code == 200 and len(whole.json()["images"]) == 2, whole.text
    for cut in (part("a.jpg") + b"\r\n" + part("b.jpg")[:-100], part("a.jpg")[:-100]):
        answer = httpx.post(f"{server[0]}/caption", content=cut, headers=headers, timeout=60)
        assert answer.status_code == 400 and "cut off" in answer.json()["error"], answer.text


def test_an_image_without_a_usable_file_name_is_named_by_its_place(server):
    """A file sent without a name, or named only with spaces, was named "" or "   " in its error (": not an
    image ..."): it is "image N", N its place in the request."""
    files = [("image", ("   ", b"not a photo", "image/jpeg"))]
    answer = httpx.post(f"{server[0]}/caption", files=files, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith("image 1: not an image"), answer.text


def test_head_asks_the_page_and_health_without_their_body(server):
    """`curl -I` and load balancers' health checks ask with HEAD; it was a 405."""
    for path in ("/", "/health"):
        got, asked = httpx.get(f"{server[0]}{path}"), httpx.head(f"{server[0]}{path}")
        assert (asked.status_code, asked.content) == (200, b""), path
        assert asked.headers["content-type"] == got.headers["content-type"], path


def test_a_wrong_method_names_the_allowed_ones(server):
    """The schema's route is no FastAPI route: POST /openapi.json got a 405 with an empty Allow. The error said
    only "Method Not Allowed"; it names the methods too."""
    for method, path, allowed in (("GET", "/caption", "POST"), ("POST", "/health", "GET"),
                                  ("POST", "/openapi.json", "GET")):
        answer = httpx.request(method, f"{server[0]}{path}")
        assert answer.status_code == 405 and allowed in answer.json()["error"], answer.text
        methods = {name.strip() for name in answer.headers.get("allow", "").split(",")}
        assert allowed in methods and method not in methods, (path, methods)


def test_a_burst_shares_batched_passes(server, demo_run, test_images):
    path = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    before = httpx.get(f"{server[0]}/health").json()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post_files(server[0], [path]), range(32)))
    after = httpx.get(f"{server[0]}/health").json()
    assert all(answer.status_code == 200 for answer in answers)
    assert {answer.json()["images"][0]["caption"] for answer in answers} == {test_images["generated"].iloc[0]}
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 32 and batches < images / 2, (images, batches)  # several requests per forward pass


def test_no_page_loads_anything_from_the_network(server):
    page = httpx.get(f"{server[0]}/")
    assert page.status_code == 200 and "<form" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", page.text)
    for docs in ("/docs", "/redoc"):  # FastAPI's would load Swagger UI / ReDoc from a CDN
        assert httpx.get(f"{server[0]}{docs}").status_code == 404



def test_the_pages_file_picker_offers_iphone_photos(server):
    """The server reads HEIC, but `accept="image/*"` alone hides .heic files from the file picker on systems
    that know no MIME type for them (Windows without its HEIF extension)."""
    page = httpx.get(f"{server[0]}/").text
    accepted = re.search(r'<input id="file" type="file" accept="([^"]*)"', page)[1].split(",")
    assert {"image/*", ".heic", ".heif"} <= set(accepted), accepted


@contextlib.contextmanager
def offline_page(profile: Path):
    """A blank page of headless Chromium with a fresh profile; every host but 127.0.0.1 unresolvable and a
    dead proxy: the network is cut."""
    from playwright import sync_api  # requirements-dev.txt; it drives Debian's chromium, never a download

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `bash scripts/setup.sh --dev` installs it")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=[
                *CHROMIUM_FLAGS, "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_the_page_captions_an_uploaded_photo_in_chromium(server, demo_run, test_images, tmp_path):
    address = server[0]
    photo = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    requested = []
    with offline_page(tmp_path / "profile") as page:
        page.on("request", lambda request: requested.append(request.url))
        page.goto(address + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
        shown = page.inner_text("#caption")
        beams = page.locator("#beams li").count()
        page.screenshot(path=os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "serve.png")), full_page=True)
    assert shown == test_images["generated"].iloc[0]
    assert beams >= 1
    outside = [url for url in requested if not url.startswith((address, "blob:", "data:"))]
    assert not outside, outside


def test_the_page_releases_the_previous_photo(server, demo_run, test_images, tmp_path):
    """Each picked photo is shown through an object URL; the one it replaces is revoked, not held until the
    page closes."""
    photos = [demo_run / "data/demo/images" / name for name in test_images["image"].iloc[:2]]
    with offline_page(tmp_path / "profile") as page:
        page.goto(server[0] + "/")
        shown = []
        for photo in photos:
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('caption').textContent.length > 0",
                                   timeout=30_000)
            shown.append(page.eval_on_selector("#preview", "image => image.src"))
        alive = "(url) => fetch(url).then(() => true, () => false)"
        first_alive, last_alive = page.evaluate(alive, shown[0]), page.evaluate(alive, shown[1])
    assert all(url.startswith("blob:") for url in shown) and shown[0] != shown[1]
    assert not first_alive and last_alive


def test_the_page_says_when_it_captions_one_of_several_dropped_files(server, demo_run, test_images, tmp_path):
    """Dropping several photos captioned the first and left the others out without a word."""
    photos = [demo_run / "data/demo/images" / name for name in test_images["image"].iloc[:3]]
    drop = """(photos) => {
        const dropped = new DataTransfer();
        for (const [name, bytes] of photos) dropped.items.add(new File([new Uint8Array(bytes)], name));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dropped}));
    }"""
    with offline_page(tmp_path / "profile") as page:
        page.goto(server[0] + "/")
        page.evaluate(drop, [[photo.name, list(photo.read_bytes())] for photo in photos])
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
        shown = page.inner_text("#caption")
        note = page.evaluate("document.getElementById('note')?.textContent ?? ''")
    assert shown == test_images["generated"].iloc[0]
    assert "3 files dropped" in note and "other 2 not captioned" in note, note


def test_the_page_shows_no_broken_image_for_a_file_it_cannot_show(server, tmp_path):
    """A file that is not an image showed a broken image icon and its alt text above the error."""
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    with offline_page(tmp_path / "profile") as page:
        page.goto(server[0] + "/")
        page.set_input_files("#file", str(not_an_image))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        page.wait_for_function("getComputedStyle(document.getElementById('preview')).display === 'none'",
                               timeout=10_000)
        assert "notes.jpg" in page.inner_text("#error")


def test_the_page_gives_the_status_of_an_answer_that_is_not_json(server, tmp_path):
    """A proxy in front of the server may answer with its own HTML page (a 502): the page showed the JSON
    syntax error of parsing it ("Unexpected token '<'") instead of the status."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"any bytes: the answer is the proxy's")
    with offline_page(tmp_path / "profile") as page:
        page.route("**/caption", lambda route: route.fulfill(
            status=502, content_type="text/html", body="<html><body>502 Bad Gateway</body></html>"))
        page.goto(server[0] + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        error = page.inner_text("#error")
    assert "HTTP 502" in error and "token" not in error.lower(), error


@contextlib.contextmanager
def held_site(status: int, body: bytes = b""):
    """A URL whose server answers (status, body) only once the test lets it: a slow image URL, in the test's
    hands. Yields (url, asked, release)."""
    asked, release = threading.Event(), threading.Event()

    class Held(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.set()
            release.wait(30)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the server stopped the fetch: its client had left
                self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Held)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.jpg", asked, release
    finally:
        release.set()
        httpd.shutdown()


@pytest.fixture
def held_url():
    """A slow image URL that answers 404 once released."""
    with held_site(404) as held:
        yield held


def test_the_page_shows_only_the_latest_requests_answer(server, demo_run, test_images, held_url, tmp_path):
    """A URL still being fetched when a photo is picked must not put its late answer under the photo
    (the page once showed the URL's error, or its caption, beside the photo's preview)."""
    url, asked, release = held_url
    photo = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    answers = []
    with offline_page(tmp_path / "profile") as page:
        page.on("response", lambda response: answers.append(response) if response.url.endswith("/caption")
                else None)
        page.goto(server[0] + "/")
        page.fill("#url", url)
        page.click("#url-form button")
        assert asked.wait(30), "the server never fetched the URL"
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
        release.set()  # now the URL's request ends, after the photo's
        page.wait_for_function(f"window.performance.getEntriesByName('{server[0]}/caption').length >= 2",
                               timeout=30_000)
        for answer in answers:
            answer.finished()
        page.evaluate("new Promise((done) => setTimeout(done, 200))")  # its handler has run by now
        shown = {name: page.inner_text(f"#{name}") for name in ("caption", "error", "status")}
    assert [answer.status for answer in answers] == [200, 422]  # the photo's answer first, the URL's after it
    assert shown == {"caption": test_images["generated"].iloc[0], "error": "", "status": ""}


def test_a_refused_request_fetches_no_url(server, held_url):
    url, asked, _ = held_url
    answer = httpx.post(f"{server[0]}/caption", json={"url": url, "method": "sample"}, timeout=60)
    assert answer.status_code == 400 and "method" in answer.json()["error"]
    assert not asked.is_set()  # the server checked the request before it fetched anything


def test_the_caption_command_takes_urls(demo_run, images_site, test_images):
    name, expected = test_images["image"].iloc[0], test_images["generated"].iloc[0]
    url = f"{images_site}/{name}"
    result = run([sys.executable, "-m", "captioning", "caption", url, f"{images_site}/notes.txt",
                  "--allow-private-urls"], demo_run, check=False)
    assert result.stdout.splitlines() == [f"{url}\t{expected}"]
    errors = result.stderr.splitlines()
    assert result.returncode == 2 and len(errors) == 1 and "notes.txt" in errors[0] and "not an image" in errors[0]
    with_password = url.replace("http://", "http://user:secret@")  # refused, and named without its password
    refused = run([sys.executable, "-m", "captioning", "caption", url, with_password], demo_run, check=False)
    assert refused.returncode == 2 and "refused" in refused.stderr and "Traceback" not in refused.stderr
    assert "secret" not in refused.stderr and "***@" in refused.stderr, refused.stderr


def test_an_iphone_heic_photo_gets_one_caption_from_the_command_the_api_and_the_page(server, demo_run, tmp_path):
    """HEIC was refused ("convert it to JPEG") by all three. Now each reads it through the same load_image: the
    same caption (no train/serve skew), and the page, whose browser cannot show HEIC, still gives it."""
    photo = HEIC_PHOTO
    command = run([sys.executable, "-m", "captioning", "caption", str(photo)], demo_run)
    (line,) = command.stdout.splitlines()
    name, caption = line.split("\t")
    assert name == str(photo) and caption
    answer = post_files(server[0], [photo])
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"][0]["caption"] == caption
    with offline_page(tmp_path / "profile") as page:
        page.goto(server[0] + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
        assert page.inner_text("#caption") == caption and page.inner_text("#error") == ""


def test_a_missing_model_is_one_line(tmp_path):
    result = run([sys.executable, "-m", "captioning", "serve", "--model", str(tmp_path / "none")], PROJECT,
                 check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no trained model in {tmp_path / 'none'}: run "
                                                  "`dvc repro` first (or pass --model-dir)."]


def test_a_request_that_is_not_http_gets_a_json_error(server):
    """uvicorn answered it in plain text, the one error that was not JSON."""
    _, answer = stall(httpx.URL(server[0]).port, b"NOT HTTP\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower(), answer
    assert "HTTP/1.1" in json.loads(body)["error"]


def test_a_request_h11_cannot_parse_is_told_what_is_wrong(server):
    """A missing Host header, two Content-Lengths that differ and a space in a header's name all got one sentence,
    "not HTTP/1.1 the server can parse (request line or headers)", naming nothing."""
    port = httpx.URL(server[0]).port
    for head, named in ((b"GET /health HTTP/1.1\r\n", "Host"),
                        (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n",
                         "Content-Length"),
                        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad \"Name: y\r\n", 'Bad \\x22Name')):
        _, answer = stall(port, head + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert "HTTP/1.1 the server can parse" in error and named in error, (named, error)


def test_empty_lines_before_a_request_line_are_ignored(server):
    """RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before a request line, and some clients
    send a CRLF after a request's body. Each got the 400 of a request the server cannot parse."""
    port = httpx.URL(server[0]).port
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for before in (b"\r\n", b"\n", b"\r\n\r\n\n"):
        _, answer = stall(port, before + health)
        assert answer.startswith(b"HTTP/1.1 200 "), (before, answer[:200])
    post = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    _, answer = stall(port, post + b"\r\n" + health)  # the CRLF after the body, in the same packet
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"400", b"200"] and b"no image" in answer, answer
    _, answer = stall(port, b"\r\nNOT HTTP\r\n\r\n")  # what follows them is still parsed as strictly
    assert answer.startswith(b"HTTP/1.1 400 ") and b"HTTP/1.1 the server can parse" in answer, answer


@pytest.mark.parametrize("megabytes", ["0.05", "0", "-1"])
def test_a_body_limit_too_small_for_a_photo_is_refused_at_start(demo_run, megabytes):
    """--max-body-mb 0.000001 started a server, after loading its model, that refused every request."""
    result = run([sys.executable, "-m", "captioning", "serve", "--port", "0", "--max-body-mb", megabytes], demo_run,
                 check=False, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --max-body-mb {float(megabytes):g} ") and "at least 0.1" in line, line


def test_the_port_takes_connections_as_soon_as_it_is_announced():
    """The "serving" line comes before uvicorn's loop runs; a client that connects then must be queued, not
    refused (CI once saw ECONNREFUSED on the first request)."""
    from captioning.serve import listen

    sock = listen("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname(), timeout=5):
            pass  # nobody has called accept(): only a listening socket lets this through
    finally:
        sock.close()


def test_headers_too_large_get_a_431_that_says_so(server):
    """Headers past 16 KB that arrive in pieces (a browser's big cookies) got the 400 of a request that is not
    HTTP/1.1 the server can parse."""
    with socket.create_connection(("127.0.0.1", httpx.URL(server[0]).port), timeout=10) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 10_000)
        time.sleep(0.2)  # read apart: a head over 16 KB that came in one read was taken
        client.sendall(b"a" * 10_000)  # and no more: bytes sent after the answer would reset it away
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ") and b"headers are over 16 KB" in answer, answer


def test_the_16_kb_head_limit_holds_however_the_head_arrives(server):
    """A head that came in one read was taken up to ~256 KB (h11 counts only a head still incomplete after a read),
    so the 431 depended on how the network cut the bytes."""
    port = httpx.URL(server[0]).port

    def head(cookie_bytes: int) -> bytes:
        return b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: " + b"a" * cookie_bytes + b"\r\n\r\n"

    for size in (20_000, 200_000):  # whole, in one send
        _, answer = stall(port, head(size))
        assert answer.startswith(b"HTTP/1.1 431 ") and b"headers are over 16 KB" in answer, (size, answer[:200])
    _, answer = stall(port, head(15_000))  # under the limit: served
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def test_a_url_over_the_head_limit_gets_a_414(server):
    """RFC 9112 section 3: a request-target longer than the server will parse MUST get a 414; it got the 431 of
    headers too large, which told the client to send fewer cookies."""
    request = b"GET /health?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    _, answer = stall(httpx.URL(server[0]).port, request)
    assert answer.startswith(b"HTTP/1.1 414 ") and b"URL is over 16 KB" in answer, answer[:300]


def test_which_heads_are_refused_before_h11_parses_them():
    """The 414/431/505 a head gets depends only on its bytes, at the 16 KB boundary too: a request line with no end
    within it is a long URL (414), a line that ended is followed by too many headers (431)."""
    from captioning.http_limits import (
        H2_AWAITED,
        H2_REFUSED,
        H2_STREAM_1_REFUSED,
        HEAD_MAX,
        HEAD_TOO_LARGE,
        NOT_HTTP1,
        URI_TOO_LONG,
        head_refusal,
    )

    line = b"GET /health HTTP/1.1\r\n"
    whole_at_limit = line + b"Cookie: " + b"a" * (HEAD_MAX - len(line) - 12) + b"\r\n\r\n"
    assert len(whole_at_limit) == HEAD_MAX and head_refusal(whole_at_limit + b"next request") is None
    assert head_refusal(line + b"Cookie: " + b"a" * HEAD_MAX) is HEAD_TOO_LARGE  # not ended, over
    assert head_refusal(b"GET /" + b"a" * HEAD_MAX) is URI_TOO_LONG  # no line end yet, over
    assert head_refusal(b"GET /" + b"a" * HEAD_MAX + b" HTTP/1.1\r\n\r\n") is URI_TOO_LONG
    assert head_refusal(b"PRI * HTTP/3.0\r\n\r\n") is NOT_HTTP1 and head_refusal(b"GET / HTTP/2.0\r\n") is NOT_HTTP1
    preface, settings = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + bytes(6)
    assert head_refusal(preface) is H2_AWAITED and head_refusal(preface + settings) is H2_AWAITED  # its request
    opened = preface + settings + b"\x00\x00\x02\x01\x05\x00\x00\x00\x01\x82\x84"  # then HEADERS on stream 1
    assert head_refusal(opened) is H2_STREAM_1_REFUSED
    assert head_refusal(preface + settings * (HEAD_MAX // len(settings))) is H2_REFUSED  # no request in 16 KB
    assert head_refusal(b"GET / HTTP/1.0\r\n\r\n") is None and head_refusal(b"GET / HTTP/2.0") is None  # line not in


def test_each_bound_protocol_class_keeps_its_own_limits():
    """uvicorn makes each connection's protocol from the class alone: every call of bounded_protocol is a class of
    its own limits, and the 408/503 are worded with them."""
    from captioning.http_limits import BoundedH11Protocol, bounded_protocol

    first, second = bounded_protocol(5, 7, 2048), bounded_protocol(9, 3, 1024)
    assert issubclass(first, BoundedH11Protocol) and first is not second
    assert (first.limits.request_timeout_s, first.limits.max_connections) == (5, 7)
    assert b"7 connections open" in first.limits.too_many.answer and first.limits.too_many.status == 503
    assert b"3 connections open" in second.limits.too_many.answer
    assert b"within 9 s" in second.limits.headers_late.answer and b"1 KB/s" in second.limits.body_late.answer


def test_a_request_target_in_absolute_form_is_served_as_its_path(server):
    """RFC 9112 section 3.2.2: a server MUST accept `GET http://host/path` (what a client sends through a proxy); it
    was a 404, as uvicorn gave the whole URL to the routes as the path."""
    port = httpx.URL(server[0]).port
    for target, status in ((f"http://127.0.0.1:{port}/health?probe=1", 200), ("HTTP://localhost/", 200),
                           (f"http://127.0.0.1:{port}/nothing", 404)):
        _, answer = stall(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 %d " % status), (target, answer[:200])
    _, answer = stall(port, f"GET http://127.0.0.1:{port}/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      .encode())
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "ok", answer


def test_a_trailing_slash_is_a_404_naming_the_path_not_a_redirect_to_the_hosts_name(server):
    """Starlette redirected `/health/` to `/health` (307) with a Location built from the Host header, so a forged Host
    made the server answer with a redirect to any site; `POST /caption/` got an empty 307 that curl shows as nothing."""
    port = httpx.URL(server[0]).port
    _, answer = stall(port, b"GET /health/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 404 ") and b"evil.example" not in answer and b"location:" not in head.lower()
    assert "did you mean /health?" in json.loads(body)["error"], answer
    posted = httpx.post(f"{server[0]}/caption/", files={"image": ("a.png", png(8, 8))}, timeout=10)
    assert posted.status_code == 404 and "did you mean /caption?" in posted.json()["error"], posted.text
    lost = httpx.get(f"{server[0]}/nothing", timeout=10).json()["error"]
    assert "/nothing" in lost and "did you mean" not in lost and all(path in lost for path in ("/health", "/caption"))


CHUNKED_POST = (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


def test_a_malformed_chunked_body_gets_one_answer_that_says_so(server):
    """A bad chunk got the 400 of a request line or headers the server cannot parse; one that came after the 413 of
    a chunked body over --max-body-mb got that 400 too, a second answer to the same request."""
    port = httpx.URL(server[0]).port
    _, answer = stall(port, CHUNKED_POST + b"ZZZ\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"chunked transfer coding" in answer, answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        piece = b" " * 2**16
        client.sendall(CHUNKED_POST + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(20)))  # 1.25 MB
        answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        client.sendall(b"ZZZ\r\n")
        while chunk := client.recv(65536):  # until the server closes
            answer += chunk
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == 1, answer


def test_a_request_giving_its_length_twice_is_refused_and_its_connection_closed(server):
    """RFC 9112 section 6.1: a request with both Transfer-Encoding and Content-Length may be request smuggling, and the
    server MUST close the connection after answering it. uvicorn answered it by its chunks and then answered the
    request that followed on the same connection (what a proxy reading the Content-Length took for body)."""
    smuggled = (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    seconds, answer = stall(httpx.URL(server[0]).port, smuggled)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"400"], answer
    assert b"both Transfer-Encoding and Content-Length" in answer and seconds < 5, (seconds, answer)


def test_the_request_after_a_body_answered_early_is_checked_as_any_other(server):
    """A body over --max-body-mb is answered 413 by its Content-Length and then read and dropped; uvicorn started the
    request after it in its own loop, past the protocol's checks: a CRLF before it got a 400 and a head over 16 KB
    was taken."""
    port = httpx.URL(server[0]).port
    body = b" " * (2 * 2**20)  # over the fixture's --max-body-mb 1
    post = (b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body))
    cookie = b"Cookie: " + b"a" * 20_000 + b"\r\n"
    for after, statuses in ((b"\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [b"413", b"200"]),
                            (b"GET /health HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n", [b"413", b"431"])):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(post)
            answer = client.recv(65536)  # the 413, before the body
            client.sendall(body + after)
            with contextlib.suppress(ConnectionResetError):
                while chunk := client.recv(65536):
                    answer += chunk
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == statuses, (statuses, answer[-300:])


def test_sigterm_stops_it_cleanly(server):
    address, process = server  # the last test of the module: the fixture's server is stopped here
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the server did not stop within 20 s of SIGTERM")
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in process.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{address}/health", timeout=2)


@contextlib.contextmanager
def own_server(demo_run: Path, *flags: str):
    """A server of the test's own, started with these flags on any free port: (address, process). Killed at the
    end if the test has not stopped it."""
    process = subprocess.Popen([sys.executable, "-m", "captioning", "serve", "--port", "0", *flags],
                               cwd=demo_run, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", process.stdout.readline())
        assert match, process.stderr.read()
        yield f"http://127.0.0.1:{match.group(1)}", process
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_stops_it_even_with_an_upload_stalled_halfway(demo_run):
    """uvicorn waited forever for requests in progress: one client that stopped sending its body kept the
    server from ever stopping. They now get --fetch-timeout + 5 s."""
    with own_server(demo_run, "--fetch-timeout", "1") as (address, process):
        with socket.create_connection(("127.0.0.1", httpx.URL(address).port), timeout=5) as client:
            client.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"url")  # and then nothing more
            httpx.get(f"{address}/health", timeout=10)  # the stalled request is in
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)  # the grace is 6 s
            except subprocess.TimeoutExpired:
                pytest.fail("the server did not stop within 30 s of SIGTERM while an upload was stalled")
    assert process.returncode in (0, -signal.SIGTERM)


REQUEST_TIMEOUT_S = 2.0
STALLED = {  # what a client sends before it goes quiet
    "nothing": b"",
    "half the headers": b"POST /caption HTTP/1.1\r\nHost: x\r\n",
    "half the body": b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000"
                     b"\r\n\r\n{\"url",
    # answered, then the first byte of the next request: it cancels uvicorn's keep-alive timer
    "a byte after an answer": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nG",
}


def stall(port: int, sent: bytes) -> tuple[float, bytes]:
    """Send `sent` and nothing more: the seconds until the server closed the connection, and what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * REQUEST_TIMEOUT_S) as client:
        client.sendall(sent)
        start, answer = time.monotonic(), b""
        with contextlib.suppress(TimeoutError):  # still open: the elapsed time shows it
            while chunk := client.recv(65536):
                answer += chunk
        return time.monotonic() - start, answer


def test_slow_clients_are_cut_off_while_others_are_served(demo_run, test_images):
    """uvicorn let a client that sent half a request, or a byte at a time, hold its connection for ever
    (slowloris); nor did it bound the connections open at once."""
    image = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    flags = ("--request-timeout", str(REQUEST_TIMEOUT_S), "--max-connections", "6")
    with own_server(demo_run, *flags) as (address, process):
        port = httpx.URL(address).port
        with ThreadPoolExecutor(len(STALLED)) as pool:
            stalled = {case: pool.submit(stall, port, sent) for case, sent in STALLED.items()}
            time.sleep(REQUEST_TIMEOUT_S / 4)
            health, captioned = httpx.get(f"{address}/health", timeout=10), post_files(address, [image])
            open_meanwhile = not any(future.done() for future in stalled.values())
            cut = {case: future.result() for case, future in stalled.items()}
        assert health.status_code == 200 and captioned.status_code == 200 and open_meanwhile
        for case, (seconds, answer) in cut.items():
            assert REQUEST_TIMEOUT_S - 0.1 < seconds < REQUEST_TIMEOUT_S + 3, (case, seconds)
            timed_out = answer.split(b"HTTP/1.1 408 Request Timeout\r\n")
            if case == "nothing":
                assert answer == b""  # no request to answer: closed without a word
            else:
                assert len(timed_out) == 2 and b"--request-timeout" in timed_out[1], (case, answer)

        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        refused = httpx.get(f"{address}/health", timeout=10)
        for client in held:
            client.close()
        time.sleep(0.5)  # the server has seen them go
        assert refused.status_code == 503 and "--max-connections" in refused.json()["error"], refused.text
        assert httpx.get(f"{address}/health", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        _, logged = process.communicate(timeout=30)
    assert "Traceback" not in logged  # a body cut off is no server error (it logged two tracebacks)


def test_access_log_logs_every_request(demo_run):
    with own_server(demo_run, "--access-log") as (address, process):
        assert httpx.get(f"{address}/health", timeout=10).status_code == 200
        assert httpx.get(f"{address}/nothing", timeout=10).status_code == 404
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    logged = out + err
    for request in ('"GET /health HTTP/1.1" 200', '"GET /nothing HTTP/1.1" 404'):
        assert request in logged, logged  # --access-log printed nothing at all


# The server of the log tests: its `_pixels` fails on a file of this name, as a bug would, for an unexpected error
PLANTED_FAULT = "planted-fault.png"
SERVE_WITH_A_PLANTED_FAULT = f"""
import sys
from captioning import __main__ as cli, serve
real = serve._pixels
def planted(name, *args):
    if name == {PLANTED_FAULT!r}:
        raise RuntimeError("a fault the test planted")
    return real(name, *args)
serve._pixels = planted
sys.argv[0] = "captioning"
cli.main()
"""
MAX_CONNECTIONS = 4
MIN_BODY_RATE_KB = 4


@pytest.fixture(scope="module")
def logged_server(demo_run, tmp_path_factory):
    """A server with --access-log, its stdout and stderr (the whole server log) in one file: (address, log path)."""
    log = tmp_path_factory.mktemp("logged_server") / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_WITH_A_PLANTED_FAULT, "serve", "--port", "0", "--access-log",
             "--allow-private-urls", "--request-timeout", str(REQUEST_TIMEOUT_S), "--max-connections",
             str(MAX_CONNECTIONS), "--min-body-rate", str(MIN_BODY_RATE_KB)],
            cwd=demo_run, env=tool_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{match.group(1)}", log
    finally:
        process.kill()
        process.wait()


def settled_log(log: Path) -> str:
    """The server log once the lines of what was just answered are in (uvicorn logs some after answering)."""
    time.sleep(0.5)
    return log.read_text()


def test_an_unexpected_error_is_logged_once_with_its_traceback(logged_server):
    """Our handler logged it and Starlette raised it again for uvicorn, which logged it a second time."""
    address, log = logged_server
    answer = httpx.post(f"{address}/caption", files={"image": (PLANTED_FAULT, png(8, 8), "image/png")}, timeout=60)
    assert answer.status_code == 500 and "RuntimeError" in answer.json()["error"], answer.text
    assert "Traceback" not in answer.text and "planted" not in answer.text
    logged = settled_log(log)
    assert logged.count("RuntimeError: a fault the test planted") == 1, logged
    assert "Exception in ASGI application" not in logged
    assert "unexpected error answering POST /caption" in logged
    assert httpx.get(f"{address}/health", timeout=10).status_code == 200  # and it goes on serving


def test_the_access_log_has_the_answers_the_protocol_writes(logged_server):
    """The 400 for a request that is not HTTP and the 408s of --request-timeout were answered without a line in
    the access log; then the 400's line said `"- - HTTP/-"`, beside uvicorn's own warning without the client."""
    address, log = logged_server
    port = httpx.URL(address).port
    stall(port, b"NOT HTTP\r\n\r\n")
    stall(port, b"POST /caption?late=headers HTTP/1.1\r\nHost: x\r\n")
    # HTTP/1.0 marks its line: a query string on /caption is answered 400 before its body is read
    stall(port, b"POST /caption HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"url")
    stall(port, b"POST /capt")
    stall(port, b'GET /?\x1b[2J"late HTTP/1.1\r\n')  # a terminal's escape and a quote, written raw into the log
    logged = settled_log(log)
    for line in (' - "invalid request: NOT HTTP" 400 Bad Request', ' - "POST /caption?late=headers HTTP/1.1" 408',
                 ' - "POST /caption HTTP/1.0" 408', ' - "incomplete request line: POST /capt" 408',
                 r' - "GET /?\x1b[2J\x22late HTTP/1.1" 408'):
        assert re.search(r"^INFO: +127\.0\.0\.1:\d+" + re.escape(line), logged, re.MULTILINE), (line, logged)
    assert "Invalid HTTP request received" not in logged  # one event, one line


def test_the_schema_has_a_distinct_operation_id_for_each_operation(logged_server):
    """The routes served for GET and HEAD gave both operations one operationId (FastAPI warned "Duplicate Operation
    ID"), so a client generator fed /openapi.json got a broken schema."""
    address, log = logged_server
    paths = httpx.get(f"{address}/openapi.json", timeout=10).json()["paths"]
    ids = [operation["operationId"] for operations in paths.values() for operation in operations.values()]
    assert len(ids) == len(set(ids)), ids
    assert all({"get", "head"} <= set(paths[path]) for path in ("/", "/health")), paths
    assert "Duplicate Operation ID" not in settled_log(log)
    for path in ("/", "/health"):  # still served for both, and a 405 still names both
        assert httpx.head(f"{address}{path}", timeout=10).status_code == 200, path
        allowed = httpx.post(f"{address}{path}", timeout=10).headers["allow"]
        assert {name.strip() for name in allowed.split(",")} == {"GET", "HEAD"}, (path, allowed)


def h2_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """HTTP/2 frames (RFC 9113 section 4.1) as (type, stream, payload); a cut-off one fails the caller's assert."""
    frames = []
    while data:
        length, kind, stream = int.from_bytes(data[:3], "big"), data[3], int.from_bytes(data[5:9], "big")
        frames.append((kind, stream, data[9:9 + length]))
        data = data[9 + length:]
    return frames


def test_an_http2_preface_is_answered_in_http2_that_http_1_1_is_required(logged_server):
    """`curl --http2-prior-knowledge` opens with HTTP/2's preface, `PRI * HTTP/2.0` then `SM`: h11 took its first
    part for an HTTP request (a 404) and `SM` for a second, unparsable one (a 400); then the one 505 in HTTP/1.1,
    which curl read as HTTP/2 frames: "Empty reply from server". It is the server's HTTP/2 preface (SETTINGS) and
    the error HTTP_1_1_REQUIRED (RFC 9113 section 7): on the connection (GOAWAY) when no request follows it within
    --request-timeout."""
    address, log = logged_server
    before = len(log.read_text())
    seconds, answer = stall(httpx.URL(address).port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    (settings, goaway) = h2_frames(answer)
    assert settings == (0x4, 0, b"") and goaway[:2] == (0x7, 0), answer  # SETTINGS, GOAWAY
    assert goaway[2][:8] == bytes(4) + b"\x00\x00\x00\x0d" and b"HTTP/1.1 only" in goaway[2], answer
    assert REQUEST_TIMEOUT_S - 0.1 < seconds < REQUEST_TIMEOUT_S + 3, seconds  # its request awaited, then closed
    logged = settled_log(log)[before:].splitlines()
    assert len(logged) == 1 and re.search(r'127\.0\.0\.1:\d+ - "PRI \* HTTP/2\.0" 505 ', logged[0]), logged


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_http2_prior_knowledge_gets_its_answer_in_http_1_1(logged_server):
    """curl's first request, refused on its stream with HTTP_1_1_REQUIRED (RST_STREAM), is sent again in HTTP/1.1:
    the answer, where it printed "Empty reply from server". Ten times: a refusal sent before curl's request had
    arrived, or followed at once by the end of the connection, failed about one run in eight."""
    address, log = logged_server
    before = len(log.read_text())
    for _ in range(10):
        result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}",
                                 f"{address}/health"], capture_output=True, text=True, timeout=30)
        answer, version = result.stdout.rsplit("\n", 1)
        assert result.returncode == 0 and json.loads(answer)["status"] == "ok" and version == "1.1", result
    logged = settled_log(log)[before:]
    assert '"PRI * HTTP/2.0" 505' in logged and '"GET /health HTTP/1.1" 200' in logged, logged


def test_connect_and_options_asterisk_get_one_answer_each(logged_server):
    """`CONNECT host:443` (a proxy's method) and `OPTIONS *` (RFC 9110 section 9.3.7: about the server as a whole)
    got the routes' JSON 404. CONNECT is a 501 naming the methods served, and the connection is closed; `OPTIONS *`
    a 200 with them in Allow; the asterisk with another method a 400."""
    address, log = logged_server
    port = httpx.URL(address).port
    before = len(log.read_text())
    seconds, answer = stall(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 501 ") and b"\r\nallow: GET, HEAD, POST" in head, answer
    assert "not a proxy" in json.loads(body)["error"] and seconds < REQUEST_TIMEOUT_S / 2, (seconds, answer)
    _, answer = stall(port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nallow: GET, HEAD, POST" in head and body == b"", answer
    _, answer = stall(port, b"GET * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"for OPTIONS only" in answer, answer
    logged = settled_log(log)[before:].splitlines()
    assert len(logged) == 3 and "Traceback" not in "".join(logged), logged
    for line, status in zip(logged, ("CONNECT example.com:443 HTTP/1.1\" 501", "OPTIONS * HTTP/1.1\" 200",
                                     "GET * HTTP/1.1\" 400"), strict=True):
        assert line.startswith("INFO:") and status in line, (status, logged)


def test_a_password_in_a_url_reaches_no_answer_and_no_log_line(logged_server):
    """A URL's user name and password (`http://user:secret@host/x.jpg`) were quoted whole by the fetch's errors and,
    in a request target, by the access log."""
    address, log = logged_server
    port = httpx.URL(address).port
    before = len(log.read_text())
    url = f"http://user:secret@127.0.0.1:{port}/health"
    for answer in (httpx.post(f"{address}/caption", json={"url": url}, timeout=60),
                   httpx.post(f"{address}/caption", data={"url": url}, files={"image": ("a.png", png(8, 8))},
                              timeout=60)):
        assert answer.status_code == 400 and "***@" in answer.json()["error"], answer.text
        assert "secret" not in answer.text
    _, answer = stall(port, f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    stall(port, f"GET {url} HTTP/1.1\r\nHost".encode())  # cut off by --request-timeout: a 408 quoting what came
    logged = settled_log(log)[before:]
    assert "secret" not in logged and logged.count("***@") == 1, logged


def test_an_absolute_target_that_is_not_a_url_is_a_400_without_a_traceback(logged_server):
    """`GET http://[::1/health` (a bracket unclosed) made the absolute-form middleware's URL parser raise: a 500, and
    a traceback in the log."""
    address, log = logged_server
    before = len(log.read_text())
    _, answer = stall(httpx.URL(address).port, b"GET http://user:secret@[::1/health HTTP/1.1\r\nHost: x\r\n"
                                               b"Connection: close\r\n\r\n")
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and "not a valid URL" in json.loads(body)["error"], answer
    logged = settled_log(log)[before:]
    assert b"secret" not in answer and "secret" not in logged and "Traceback" not in logged, logged
    assert re.search(r'"GET http://\*\*\*@\[::1/health HTTP/1\.1" 400 ', logged), logged


def test_a_client_that_reads_none_of_its_answers_is_cut_off(logged_server):
    """A client that pipelined requests and never read the answers (a slow-read attack) held its connection, and its
    place under --max-connections, for good: uvicorn waited with no limit for it to read on."""
    address, log = logged_server
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills sooner
        client.connect(("127.0.0.1", httpx.URL(address).port))
        client.setblocking(False)
        requests, start, cut_after = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100, time.monotonic(), None
        while cut_after is None and time.monotonic() - start < 4 * REQUEST_TIMEOUT_S:
            try:
                client.send(requests)
            except BlockingIOError:  # every buffer on the way is full: the server no longer reads either
                time.sleep(0.05)
            except OSError:  # reset by the server
                cut_after = time.monotonic() - start
    assert cut_after is not None, "still open"
    assert "read none of its answers" in settled_log(log)
    assert httpx.get(f"{address}/health", timeout=10).status_code == 200


def test_a_client_sending_only_empty_lines_is_cut_off_and_others_served(logged_server):
    """The empty lines before a request line are dropped, not answered: a client that sends nothing else is closed
    by --request-timeout like one that sends nothing, and the server goes on serving meanwhile."""
    address, _ = logged_server
    port = httpx.URL(address).port
    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(stall, port, b"\r\n" * 3)
        time.sleep(REQUEST_TIMEOUT_S / 4)
        assert httpx.get(f"{address}/health", timeout=5).status_code == 200
        seconds, answer = stalled.result()
    assert answer == b"" and REQUEST_TIMEOUT_S - 0.1 < seconds < REQUEST_TIMEOUT_S + 3, (seconds, answer)


def test_a_connection_over_the_cap_is_answered_at_once(logged_server):
    """It was held, unanswered, until its headers came or --request-timeout ran out."""
    address, log = logged_server
    port = httpx.URL(address).port
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # the server has taken them all
        seconds, answer = stall(port, b"")
    finally:
        for client in held:
            client.close()
    assert seconds < REQUEST_TIMEOUT_S / 2, seconds
    assert answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer, answer
    assert re.search(r'127\.0\.0\.1:\d+ - "not read: over --max-connections" 503', settled_log(log))


def test_refused_connections_hold_no_place_under_the_cap(logged_server):
    """A refused connection counted against --max-connections for the 2 s its request is read and dropped, so a
    burst of them kept good clients out for that long after the connections that filled the cap had gone."""
    from captioning.http_limits import LINGER_S

    port = httpx.URL(logged_server[0]).port
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.3)  # the server has taken them all
    refused = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        assert all(client.recv(65536).startswith(b"HTTP/1.1 503 ") for client in refused)
        start = time.monotonic()
        for client in held:
            client.close()
        time.sleep(0.3)  # the server has seen them go
        answer = httpx.get(f"{logged_server[0]}/health", timeout=10)
        assert time.monotonic() - start < LINGER_S  # asked while the refused ones still linger
    finally:
        for client in refused:
            client.close()
    assert answer.status_code == 200, answer.text


def test_a_request_asking_to_upgrade_is_answered_without_a_warning(logged_server):
    """`curl --http2` asks each plain-HTTP request to upgrade to h2c; uvicorn answered in HTTP/1.1 (as it may) and
    logged two warnings for each, the second telling the operator to install a WebSocket library."""
    address, log = logged_server
    before = len(log.read_text())
    for upgrade in ({"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                     "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA"},
                    {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}):
        answer = httpx.get(f"{address}/health?upgrade={upgrade['Upgrade']}", headers=upgrade, timeout=10)
        assert answer.status_code == 200 and answer.http_version == "HTTP/1.1", (upgrade, answer.text)
    logged = settled_log(log)[before:].splitlines()
    assert len(logged) == 2 and all(line.startswith("INFO:") and " 200 OK" in line for line in logged), logged


def send_body_at(port: int, body: bytes, bytes_per_s: float) -> tuple[float, bytes]:
    """POST /caption a JSON body in pieces at this rate: the seconds until it was answered, and the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body))
        start, piece = time.monotonic(), 256
        # poll, not select: select refuses a descriptor past 1023, which a long test session's can be
        answered = select.poll()
        answered.register(client, select.POLLIN)
        with contextlib.suppress(OSError):  # cut off halfway: the answer says why
            for offset in range(0, len(body), piece):
                if answered.poll(0):  # answered already: more bytes would get a reset back
                    break
                client.sendall(body[offset:offset + piece])
                time.sleep(piece / bytes_per_s)
        client.settimeout(10)
        answer = b""
        while chunk := client.recv(65536):  # until the server closes
            answer += chunk
        return time.monotonic() - start, answer


def test_a_body_that_keeps_the_minimum_rate_may_take_longer_than_the_timeout(logged_server):
    """--request-timeout was a deadline for the whole request: a 20 MB body needed ~2.8 Mbit/s within 60 s. Past
    it, a body must keep up --min-body-rate; one that trickles below it is still cut off."""
    port = httpx.URL(logged_server[0]).port
    rate = MIN_BODY_RATE_KB * 1024
    body = b'{"url": ""' + b" " * int(1.5 * REQUEST_TIMEOUT_S * 2 * rate) + b"}"  # 3 timeouts long at twice the rate
    seconds, answer = send_body_at(port, body, 2 * rate)
    assert seconds > REQUEST_TIMEOUT_S + 0.5 and answer.startswith(b"HTTP/1.1 400 ") and b"no image" in answer, answer
    seconds, answer = send_body_at(port, body, rate / 4)
    # due once the time past the timeout outruns the bytes' credit: T / (1 - 1/4)
    assert seconds < REQUEST_TIMEOUT_S / 0.75 + 1, seconds
    assert answer.startswith(b"HTTP/1.1 408 ") and b"--min-body-rate" in answer, answer


def test_a_body_sent_on_after_its_answer_earns_no_time(logged_server):
    """A body refused by its Content-Length (413) is not awaited: a client that sent on at the minimum rate held
    its connection for as long as the Content-Length it declared, say a terabyte."""
    port = httpx.URL(logged_server[0]).port
    piece, rate = b" " * 256, 2 * MIN_BODY_RATE_KB * 1024
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % 2**40)
        start, closed_after = time.monotonic(), None
        while closed_after is None and time.monotonic() - start < 3 * REQUEST_TIMEOUT_S:
            try:
                client.sendall(piece)
            except OSError:  # the server closed the connection
                closed_after = time.monotonic() - start
            time.sleep(len(piece) / rate)
    assert closed_after is not None and closed_after < REQUEST_TIMEOUT_S + 1.5, closed_after


def test_a_client_that_leaves_has_its_images_left_uncaptioned(logged_server, demo_run, test_images):
    """Its images were fetched, decoded and captioned all the same, for nobody."""
    address, log = logged_server
    photo = demo_run / "data/demo/images" / test_images["image"].iloc[0]
    with held_site(200, photo.read_bytes()) as (url, asked, release):
        request = httpx.Request("POST", f"{address}/caption", data={"url": url},
                                files={"image": (photo.name, photo.read_bytes(), "image/jpeg")})
        head = b"".join(b"%s: %s\r\n" % header for header in request.headers.raw)
        before = httpx.get(f"{address}/health", timeout=10).json()["images"]
        with socket.create_connection(("127.0.0.1", httpx.URL(address).port), timeout=10) as client:
            client.sendall(b"POST /caption HTTP/1.1\r\n" + head + b"\r\n" + request.read())
            assert asked.wait(30), "the server never fetched the URL"
        time.sleep(0.5)  # the server has seen it go
        release.set()
        time.sleep(2)  # long enough for the fetch and the captions, had they gone on
    assert httpx.get(f"{address}/health", timeout=10).json()["images"] == before
    left = [line for line in settled_log(log).splitlines() if "its images were not captioned" in line]
    assert len(left) == 1 and left[0].startswith("WARNING:") and "POST /caption" in left[0], left


def test_a_malformed_multipart_body_is_a_400_without_a_bare_log_line(logged_server):
    """python-multipart printed "Expected boundary character ..." alone on stderr, outside the server log's
    format; the client's 400 and the access log already tell it."""
    address, log = logged_server
    answer = httpx.post(f"{address}/caption", content=b"--x\r\nContent-Disposition: form-data; name=image\r\n\r\nabc",
                        headers={"Content-Type": "multipart/form-data; boundary=y"}, timeout=60)
    assert answer.status_code == 400 and "multipart" in answer.json()["error"], answer.text
    assert "boundary character" not in settled_log(log)
