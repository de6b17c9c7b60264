"""The web page of ``brainscan serve`` in a real browser (Chromium driven by Playwright) against the real server: a
real MRI slice is uploaded and its result, probability bars and activation map appear; a bad file gives an error in
words and the page stays usable; the disclaimer never leaves the screen; the layout holds at 1280 and 375 px."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainscan import train

from .conftest import shared_path, write_class_folders
from .test_train import tiny_config

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright not installed: pip install playwright")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'brainscan[serve]'")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
MAX_UPLOAD_MB = 2.0  # small, so the page's own size check can be tried without a large file


def chromium_executable() -> str:
    for candidate in (os.environ.get("BRAINSCAN_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("Chromium not installed: apt-get install chromium (or set BRAINSCAN_CHROMIUM to its binary)")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on synthetic slices: its label on a real slice means nothing, but it is one of its
    classes, and the model has test metrics, calibration and activation maps like any other."""
    root = tmp_path_factory.mktemp("serve-page")
    data = write_class_folders(root / "data", {"yes": 16, "no": 16}, size=40)
    return train(tiny_config(data, root / "run", epochs=1)).run_dir / "best.pt"


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[str]:
    """The real server (uvicorn) in a background thread, on a free loopback port; yields its base URL."""
    from brainscan.serve import ServeConfig, make_server

    urls: list[str] = []
    ready = threading.Event()

    def on_ready(url: str) -> None:
        urls.append(url)
        ready.set()

    config = ServeConfig(checkpoint=checkpoint, port=0, max_upload_mb=MAX_UPLOAD_MB)
    server = make_server(config, on_ready=on_ready)
    thread = threading.Thread(target=server.run, name="brainscan-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not ready.wait(0.1):
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail("the brainscan server did not start (see its log above)")
    yield urls[0]
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    executable = chromium_executable()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def card(server: str) -> dict:
    """The server's model card (GET /v1/model), read without the browser."""
    from urllib.request import urlopen

    with urlopen(f"{server}/v1/model", timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def slices() -> tuple[Path, Path]:
    """Two real slices: a Figshare T1 contrast-enhanced grey JPEG and a Kaggle yes/no JPEG (colour, other size)."""
    figshare = shared_path("figshare-cheng", "images", "meningioma", "1.jpg")
    return figshare, shared_path("brain-mri-yes-no", "yes", "Y1.jpg")


# ------------------------------------------------------------------------------------------------- helpers


def save_screenshot(page: sync_api.Page, tmp_path: Path, name: str) -> None:
    """Full-page screenshot into the test's tmp_path and, when BRAINSCAN_SCREENSHOTS names a folder, there too."""
    path = tmp_path / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # a full-page shot draws the sticky banner where the window is scrolled
    page.screenshot(path=str(path), full_page=True)
    if folder := os.environ.get("BRAINSCAN_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / path.name)


def expect_disclaimer_on_screen(page: sync_api.Page) -> None:
    """The disclaimer is visible and inside the viewport, wherever the page is scrolled."""
    banner = page.locator("#disclaimer")
    sync_api.expect(banner).to_be_visible()
    sync_api.expect(banner).to_contain_text("not a medical device")
    box = banner.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= page.viewport_size["height"]


def expect_result(page: sync_api.Page, card: dict) -> None:
    """A finished result: a class of the model, one bar per class summing to 100%, the slice and its overlay."""
    result = page.locator("#result")
    sync_api.expect(result).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    sync_api.expect(result).to_have_attribute("aria-busy", "false")
    sync_api.expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#result-label").inner_text().strip() in card["class_names"]
    bars = page.locator(".prob-bar")
    sync_api.expect(bars).to_have_count(len(card["class_names"]))
    values = [float(bars.nth(i).get_attribute("aria-valuenow")) for i in range(bars.count())]
    assert all(0 <= v <= 100 for v in values) and sum(values) == pytest.approx(100, abs=0.5)
    for i in range(bars.count()):  # the percentage is written out, not only drawn
        assert bars.nth(i).get_attribute("aria-valuetext").endswith("%")
    assert page.locator("#probabilities").inner_text().count("%") == len(card["class_names"])
    sync_api.expect(page.locator("#slice")).to_be_visible()
    assert page.eval_on_selector("#slice", "img => img.complete && img.naturalWidth > 0")
    sync_api.expect(page.locator("#overlay")).to_be_visible()
    assert page.eval_on_selector("#overlay", "img => img.complete && img.naturalWidth > 0")
    sync_api.expect(page.locator("#cam-note")).to_contain_text("not a diagnosis")


def expect_no_horizontal_scroll(page: sync_api.Page) -> None:
    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= inner_width, f"page is {scroll_width} px wide in a {inner_width} px window"


def upload_text_file(page: sync_api.Page) -> None:
    """A text file named with markup: the server refuses it, the page says why in words and injects nothing."""
    name = '<img src=x onerror="window.pwned=1">notes.txt'
    with page.expect_response("**/v1/predict*") as response:
        page.set_input_files("#file-input", files=[{"name": name, "mimeType": "text/plain", "buffer": b"not an image"}])
    assert response.value.status == 415
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible(timeout=TIMEOUT_MS)
    sync_api.expect(error).to_have_attribute("role", "alert")
    sync_api.expect(error).to_contain_text(response.value.json()["detail"])  # the server's reason, in its words
    message = error.inner_text()
    for leak in ("Traceback", 'File "', '{"detail"', "[object Object]", "undefined"):
        assert leak not in message, message
    assert error.locator("img").count() == 0 and page.evaluate("window.pwned") is None
    sync_api.expect(page.locator("#result")).to_have_attribute("data-state", "error")
    sync_api.expect(page.locator("#result-body")).to_be_hidden()  # the previous result is not left on show


def drop_file(page: sync_api.Page, path: Path) -> None:
    """Drop ``path`` on the drop zone as a user dragging it from the desktop would (a DataTransfer with the file)."""
    data = list(path.read_bytes())
    transfer = page.evaluate_handle(
        """([name, bytes]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/jpeg"}));
            return transfer;
        }""",
        [path.name, data],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


# --------------------------------------------------------------------------------------------------- tests


def test_desktop_upload_result_overlay_error_and_recovery(
    browser: sync_api.Browser, server: str, card: dict, slices: tuple[Path, Path], tmp_path: Path
) -> None:
    assert card["cam_available"], "the tiny CNN has activation maps; the page test needs them"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # Playwright turns on file-chooser interception when the first listener is added, without waiting for it:
    # added only by expect_file_chooser, a keypress right after can open the (headless, invisible) native dialog.
    page.on("filechooser", lambda chooser: None)
    console_errors: list[str] = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    page.goto(server)
    expect_disclaimer_on_screen(page)
    sync_api.expect(page.locator("#disclaimer-text")).to_have_text(card["disclaimer"])

    model_card = page.locator("#model-card")
    sync_api.expect(model_card).to_have_attribute("aria-busy", "false", timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#model-arch")).to_have_text(card["arch"])
    for name in card["class_names"]:
        sync_api.expect(page.locator("#model-classes")).to_contain_text(name)
    sync_api.expect(page.locator("#model-sha")).to_have_text(card["sha256"][:12])
    sync_api.expect(page.locator("#metrics-rows")).to_contain_text("Balanced accuracy")
    sync_api.expect(page.locator("#protocol")).to_contain_text("test")

    # The result region is marked busy while a slice is analysed (recorded as it happens: it is brief).
    page.evaluate(
        """() => {
            const result = document.getElementById("result");
            window.busy = [];
            new MutationObserver(() => window.busy.push(result.getAttribute("aria-busy")))
                .observe(result, {attributes: true, attributeFilter: ["aria-busy"]});
        }"""
    )

    # Keyboard: Tab reaches the drop zone, and Enter there opens the file picker.
    for _ in range(10):
        if page.evaluate("document.activeElement && document.activeElement.id") == "drop-zone":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop-zone", "the drop zone is not reachable with Tab"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(slices[0])
    expect_result(page, card)
    assert page.evaluate("window.busy") == ["true", "false"]
    expect_disclaimer_on_screen(page)

    # The activation map: the checkbox hides and shows it, the slider sets its opacity.
    overlay, toggle = page.locator("#overlay"), page.get_by_label("Show activation map")
    toggle.uncheck()
    sync_api.expect(overlay).to_be_hidden()
    toggle.check()
    sync_api.expect(overlay).to_be_visible()
    page.get_by_label("Map opacity").fill("20")
    assert float(overlay.evaluate("img => getComputedStyle(img).opacity")) == pytest.approx(0.2)
    page.locator("#cam-opacity").press("ArrowRight")  # the slider works from the keyboard too
    assert float(overlay.evaluate("img => getComputedStyle(img).opacity")) > 0.2
    save_screenshot(page, tmp_path, "serve-page-1280-result")

    upload_text_file(page)
    expect_disclaimer_on_screen(page)
    save_screenshot(page, tmp_path, "serve-page-1280-error")

    # Too large for the server's limit: refused in the page, before any upload.
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    too_big = int(MAX_UPLOAD_MB * 1024 * 1024) + 1
    page.set_input_files(
        "#file-input", files=[{"name": "big.jpg", "mimeType": "image/jpeg", "buffer": b"\0" * too_big}]
    )
    sync_api.expect(page.locator("#error")).to_contain_text("up to 2 MB")
    assert posts == []

    # The page stays usable: the next good file (dropped this time) gives a result and clears the error.
    drop_file(page, slices[1])
    expect_result(page, card)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    expect_disclaimer_on_screen(page)
    expect_no_horizontal_scroll(page)
    assert console_errors == []
    page.close()


def test_phone_width_layout(
    browser: sync_api.Browser, server: str, card: dict, slices: tuple[Path, Path], tmp_path: Path
) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 812}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    page.goto(server)
    expect_disclaimer_on_screen(page)
    sync_api.expect(page.locator("#model-card")).to_have_attribute("aria-busy", "false", timeout=TIMEOUT_MS)
    expect_no_horizontal_scroll(page)

    page.set_input_files("#file-input", slices[0])
    expect_result(page, card)
    expect_no_horizontal_scroll(page)
    page.get_by_label("Show activation map").uncheck()
    sync_api.expect(page.locator("#overlay")).to_be_hidden()
    page.get_by_label("Show activation map").check()
    # The slice fills the phone's width without spilling out of it.
    box = page.locator("#viewer").bounding_box()
    assert box is not None and box["width"] >= 250 and box["x"] >= 0 and box["x"] + box["width"] <= 375
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    expect_disclaimer_on_screen(page)
    save_screenshot(page, tmp_path, "serve-page-375-result")

    upload_text_file(page)
    expect_no_horizontal_scroll(page)
    save_screenshot(page, tmp_path, "serve-page-375-error")
    page.set_input_files("#file-input", slices[1])
    expect_result(page, card)
    context.close()


def test_page_explains_answers_it_cannot_use(
    browser: sync_api.Browser, server: str, card: dict, slices: tuple[Path, Path]
) -> None:
    """Answers this server does not give today but a proxy, another version or a model without maps can: the page
    still shows the prediction without a map, and says what went wrong in words, never as JSON or a traceback."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    sync_api.expect(page.locator("#model-card")).to_have_attribute("aria-busy", "false", timeout=TIMEOUT_MS)
    error = page.locator("#error")

    def answer_with_cam(route: sync_api.Route) -> None:
        if "cam=true" in route.request.url:
            route.fulfill(status=409, json={"detail": "No activation map for this model: it is an ONNX export."})
        else:
            route.continue_()

    page.route("**/v1/predict*", answer_with_cam)
    page.set_input_files("#file-input", slices[0])
    sync_api.expect(page.locator("#result")).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    assert page.locator("#result-label").inner_text() in card["class_names"]
    sync_api.expect(page.locator("#overlay")).to_be_hidden()
    sync_api.expect(page.locator("#cam-controls")).to_be_hidden()
    sync_api.expect(page.locator("#cam-note")).to_have_text("No activation map for this model: it is an ONNX export.")
    page.unroute("**/v1/predict*")

    def answer(status: int, body: str, content_type: str):
        return lambda route: route.fulfill(status=status, body=body, content_type=content_type)

    failures = [  # (status, body, content type), the words the page must show
        (422, json.dumps({"detail": [{"loc": ["body", "file"], "msg": "Field required"}]}), "application/json"),
        (500, '<html><pre>Traceback (most recent call last):\n  File "app.py"</pre></html>', "text/html"),
        (502, "Bad Gateway", "text/plain"),
    ]
    expected = ["file: Field required", "The server failed while analysing the file.", "The server is unreachable."]
    for (status, body, content_type), words in zip(failures, expected, strict=True):
        page.route("**/v1/predict*", answer(status, body, content_type))
        page.set_input_files("#file-input", slices[0])
        sync_api.expect(error).to_contain_text(words, timeout=TIMEOUT_MS)
        assert not any(leak in error.inner_text() for leak in ("Traceback", "{", "[object", "<html"))
        sync_api.expect(page.locator("#result-body")).to_be_hidden()
        page.unroute("**/v1/predict*")

    page.route("**/v1/predict*", lambda route: route.abort("connectionrefused"))
    page.set_input_files("#file-input", slices[0])
    sync_api.expect(error).to_contain_text("could not be reached", timeout=TIMEOUT_MS)
    page.close()
