"""The GUI on 127.0.0.1: its HTTP API (gradio_client) and a real browser (Playwright + Chromium)."""

import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from hydra import compose, initialize_config_dir
from PIL import Image

from fetalbrain.app import build_app, model_choices
from tests.conftest import CONF, DATA, ROOT, bad_files

REAL = sorted(DATA.glob("test/*.jpg"))[1:5]  # heads the finder trusts (the first shows two head-like regions)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "outputs" / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained_checkpoint):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("app", overrides=[f"ckpt={trained_checkpoint}", "concurrency_limit=4"])
    app = build_app(cfg)
    port = free_port()
    app.queue(default_concurrency_limit=4).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size=cfg.max_file_size, quiet=True
    )
    yield {"url": f"http://127.0.0.1:{port}/", "model": next(iter(model_choices(cfg)))}
    app.close()


def test_default_model_is_the_newest_run_and_others_can_be_picked(trained_checkpoint, tmp_path):
    run_dir = trained_checkpoint.parent.parent
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("app", overrides=[f"paths.log_dir={run_dir.parent}"])
        empty = compose("app", overrides=[f"paths.log_dir={tmp_path}"])
    choices = model_choices(cfg)
    assert list(choices.values())[0] == trained_checkpoint
    assert list(choices)[0].startswith("efficientnet_lite0 · ")
    with pytest.raises(FileNotFoundError, match="no trained run"):
        model_choices(empty)


def call(served, paths):
    client = Client(served["url"], verbose=False)
    return client.predict([handle_file(str(p)) for p in paths], served["model"], api_name="/predict")


def test_api_predicts_uploaded_images(served):
    summary, scores, head, heatmap, gallery, table = call(served, REAL[:2])
    assert summary.count("- **") == 2 and "abnormal probability" in summary
    assert summary.count("fetal head found (confidence ") == 2  # the shipped finder's verdict on each image
    assert Path(head).is_file()  # the first image with the head's outline
    confidences = [c["confidence"] for c in scores["confidences"]]
    assert len(confidences) == 16 and confidences == sorted(confidences, reverse=True)
    assert scores["label"] == scores["confidences"][0]["label"]
    assert Path(heatmap).is_file() and len(gallery) == 2
    assert table["headers"][:3] == ["file", "name", "confidence"] and len(table["data"]) == 2
    assert "head_circumference_px" in table["headers"]


def test_an_image_with_no_fetal_head_gets_no_class(served, tmp_path):
    """A black frame is read, but the finder trusts no head in it: the answer is withheld, with the reason."""
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(tmp_path / "black.png")
    summary, scores, head, *_ = call(served, [tmp_path / "black.png"])
    assert "No fetal head found (a flat image" in summary and "No anomaly class" in summary
    assert "No fetal head found" in scores["label"] and not scores.get("confidences")


def test_bad_uploads_get_a_message_and_the_server_stays_up(served, tmp_path):
    bad = bad_files(tmp_path)
    summary, scores, head, heatmap, gallery, table = call(served, list(bad.values()))
    assert summary.count("could not be read") == 4 and not scores and gallery == []
    assert "empty file" in summary and "pixel limit" in summary
    summary, scores, *_ = call(served, [bad["truncated"], REAL[0]])
    assert "could not be read" in summary and scores["label"]  # the good image still answered
    assert call(served, [REAL[1]])[1]["label"]  # and the next request is served


def test_concurrent_clients_all_get_answers(served):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: call(served, [REAL[i % len(REAL)]]), range(8)))
    assert all(r[1] and r[1]["label"] for r in results)


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian package 'chromium'; `make browser` installs it)"
)
def test_browser_upload_shows_class_scores_and_heatmap(served):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(served["url"], wait_until="networkidle")
            assert "Research tool, not a medical device" in page.content()
            page.locator("input[type=file]").first.set_input_files([str(REAL[0])])
            page.locator("#summary li").first.wait_for(timeout=60_000)
            summary = page.locator("#summary").inner_text()
            scores = page.locator("#scores").inner_text()
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "gui.png"), full_page=True)
        finally:
            browser.close()
    assert REAL[0].name in summary and "abnormal probability" in summary
    predicted = summary.split(f"{REAL[0].name}: ", 1)[1].split(" (confidence", 1)[0]
    assert predicted in scores and scores.count("%") == 16  # every class, as a percentage bar
    assert (ARTIFACTS / "gui.png").stat().st_size > 10_000
