"""Download against a local HTTP server (mirror and Roboflow paths) and the compact-copy tool."""

import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from fetalbrain.data.compact import compact_dataset
from fetalbrain.data.download import main as download_main
from fetalbrain.data.download import write_manifest
from fetalbrain.data.readers import read_dataset


@pytest.fixture
def served_export(tmp_path, small_export):
    """A zip of a small export (inside a top folder, like a GitHub archive), served on 127.0.0.1."""
    manifest = tmp_path / "manifest.sha256"
    write_manifest(small_export, manifest)
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in small_export.rglob("*"):
            if path.is_file():
                bundle.write(path, f"mirror-abc123/{path.relative_to(small_export)}")
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            if self.path.startswith("/ws/"):
                body = json.dumps({"export": {"link": f"http://127.0.0.1:{port}/export.zip"}}).encode()
            elif self.path == "/export.zip":
                body = archive.read_bytes()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {
        "url": f"http://127.0.0.1:{port}",
        "manifest": manifest,
        "archive": archive,
        "requests": requests,
        "export": small_export,
    }
    server.shutdown()


def test_download_from_mirror_verifies_and_is_idempotent(tmp_path, served_export, capsys):
    dest = tmp_path / "full"
    args = [
        "--source",
        "mirror",
        "--url",
        served_export["url"] + "/export.zip",
        "--dest",
        str(dest),
        "--manifest",
        str(served_export["manifest"]),
    ]
    assert download_main(args) == 0
    table, _ = read_dataset(dest)
    assert len(table) == len(read_dataset(served_export["export"])[0])
    assert download_main(args) == 0  # second call: nothing fetched
    assert served_export["requests"] == ["/export.zip"]
    assert "already downloaded and verified" in capsys.readouterr().out


def test_download_through_the_roboflow_api(tmp_path, served_export, monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", "secret-key")
    dest = tmp_path / "full"
    args = [
        "--roboflow-api",
        served_export["url"] + "/ws",
        "--dest",
        str(dest),
        "--manifest",
        str(served_export["manifest"]),
    ]
    assert download_main(args) == 0
    assert served_export["requests"][0].startswith("/ws/hritwik-trivedi-gkgrv/fetal-brain-abnormalities-ultrasound/1/")
    assert (dest / "train" / "_classes.csv").is_file()


def test_download_rejects_checksum_mismatch_and_tampered_files(tmp_path, served_export, capsys):
    common = ["--manifest", str(served_export["manifest"])]
    assert (
        download_main(
            ["--archive", str(served_export["archive"]), "--sha256", "0" * 64, "--dest", str(tmp_path / "a"), *common]
        )
        == 1
    )
    assert "differs from --sha256" in capsys.readouterr().err
    tampered = (
        served_export["manifest"]
        .read_text()
        .replace(served_export["manifest"].read_text()[:64], hashlib.sha256(b"x").hexdigest(), 1)
    )
    served_export["manifest"].write_text(tampered)
    assert download_main(["--archive", str(served_export["archive"]), "--dest", str(tmp_path / "b"), *common]) == 1
    assert "does not match its SHA256" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # nothing half-written under the final name


def test_download_offline_fails_fast_with_a_clear_message(tmp_path, capsys):
    assert (
        download_main(["--url", "http://127.0.0.1:9/export.zip", "--dest", str(tmp_path / "x"), "--timeout", "2"]) == 1
    )
    err = capsys.readouterr().err
    assert "cannot reach 127.0.0.1:9" in err and "--archive FILE.zip" in err


def test_compact_copy_keeps_names_splits_and_labels(tmp_path, small_export):
    dst = tmp_path / "compact"
    count = compact_dataset(small_export, dst, size=48, quality=85)
    original, classes = read_dataset(small_export)
    compact, compact_classes = read_dataset(dst)
    assert count == len(original) and compact_classes == classes
    assert [Path(p).name for p in compact["path"]] == [Path(p).name for p in original["path"]]
    assert (dst / "valid" / "_classes.csv").read_bytes() == (small_export / "valid" / "_classes.csv").read_bytes()
    with Image.open(compact["path"][0]) as image:
        assert image.size == (48, 48) and image.mode == "L"
    provenance = (dst / "PROVENANCE.md").read_text()
    assert "CC BY 4.0" in provenance and "--size 48" in provenance
    with pytest.raises(FileExistsError, match="not empty"):
        compact_dataset(small_export, dst)
