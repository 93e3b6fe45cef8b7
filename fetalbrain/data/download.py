"""Fetch the full-resolution Roboflow export (640 px) into ``data/``.

    python -m fetalbrain.data.download                    # Roboflow if ROBOFLOW_API_KEY is set, else the mirror
    python -m fetalbrain.data.download --source mirror
    python -m fetalbrain.data.download --archive export.zip   # a zip you downloaded yourself

Every extracted file is checked against a SHA256 manifest of the original export (and the archive
itself against ``--sha256`` when given). Idempotent: a verified copy is not fetched again.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from fetalbrain.project import PROJECT_ROOT

DEFAULT_DEST = PROJECT_ROOT / "data" / "fetal-brain-ultrasound-full"
MANIFEST = Path(__file__).parent / "manifests" / "fetal-brain-ultrasound-v1.sha256"
MIRROR_URL = "https://github.com/ahmed-838/gencare_dataset/archive/36013d48569b56b8107cb0c888f3264888b8cc5d.zip"
ROBOFLOW_API = "https://api.roboflow.com"
ROBOFLOW_DATASET = ("hritwik-trivedi-gkgrv", "fetal-brain-abnormalities-ultrasound", 1, "multiclass")
VERIFIED_MARKER = ".verified"


class DownloadError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path, manifest: Path) -> int:
    """Record ``sha256  split/name`` for every file of a Roboflow export (images and CSVs)."""
    files = sorted(p for p in root.glob("*/*") if p.is_file() and p.parent.name in ("train", "valid", "test"))
    manifest.write_text("".join(f"{sha256_of(p)}  {p.parent.name}/{p.name}\n" for p in files))
    return len(files)


def read_manifest(manifest: Path) -> dict[str, str]:
    return {name: digest for digest, name in (line.split("  ", 1) for line in manifest.read_text().splitlines())}


def _open(url: str, timeout: float):
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "fetalbrain"}), timeout=timeout
        )
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{_redact(url)}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        host = urllib.parse.urlparse(url).netloc
        raise DownloadError(
            f"cannot reach {host} ({getattr(error, 'reason', error)}): are you offline? Download the export "
            f"by hand ({MIRROR_URL}) and run: python -m fetalbrain.data.download --archive FILE.zip"
        ) from error


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


def fetch(url: str, target: Path, timeout: float = 30.0) -> Path:
    """Stream ``url`` to ``target`` with a progress bar; a partial file never takes the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with _open(url, timeout) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        columns = (*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, transient=not sys.stderr.isatty()) as progress:
            task = progress.add_task(f"downloading {target.name}", total=total)
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                progress.update(task, advance=len(block))
    partial.replace(target)
    return target


def roboflow_export_url(api_key: str, api: str = ROBOFLOW_API, timeout: float = 30.0) -> str:
    workspace, project, version, fmt = ROBOFLOW_DATASET
    url = f"{api}/{workspace}/{project}/{version}/{fmt}?api_key={urllib.parse.quote(api_key)}"
    with _open(url, timeout) as response:
        payload = json.loads(response.read() or b"{}")
    link = payload.get("export", {}).get("link")
    if not link:
        raise DownloadError(f"Roboflow answered without an export link: {str(payload)[:200]}")
    return link


def extract_verified(archive: Path, dest: Path, manifest: dict[str, str]) -> int:
    """Extract the manifest's files (from wherever ``train/_classes.csv`` sits in the zip) and verify."""
    try:
        bundle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{archive}: not a zip archive ({error})") from error
    with bundle:
        anchors = [n for n in bundle.namelist() if n.endswith("train/_classes.csv")]
        if not anchors:
            raise DownloadError(f"{archive}: no train/_classes.csv inside: not a Roboflow multi-class export")
        prefix = anchors[0][: -len("train/_classes.csv")]
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        for name, digest in manifest.items():
            member = prefix + name
            try:
                data = bundle.read(member)
            except KeyError as error:
                raise DownloadError(f"{archive}: {member} is missing from the archive") from error
            if hashlib.sha256(data).hexdigest() != digest:
                raise DownloadError(f"{archive}: {member} does not match its SHA256 in the manifest")
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        for extra in ("README.dataset.txt", "README.roboflow.txt"):
            if prefix + extra in bundle.namelist():
                (staging / extra).write_bytes(bundle.read(prefix + extra))
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    (dest / VERIFIED_MARKER).write_text("all files match the SHA256 manifest\n")
    return len(manifest)


def already_verified(dest: Path, manifest: dict[str, str]) -> bool:
    return (dest / VERIFIED_MARKER).is_file() and all((dest / name).is_file() for name in manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("auto", "roboflow", "mirror"), default="auto")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where the export goes")
    parser.add_argument("--archive", type=Path, help="use this local zip instead of downloading")
    parser.add_argument("--url", default=MIRROR_URL, help="mirror archive URL")
    parser.add_argument("--roboflow-api", default=ROBOFLOW_API, help="Roboflow API base URL")
    parser.add_argument("--sha256", help="expected SHA256 of the archive itself")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="SHA256 manifest of the export's files")
    parser.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.manifest)
    try:
        if already_verified(args.dest, manifest):
            print(f"{args.dest}: already downloaded and verified ({len(manifest)} files)")
            return 0
        archive = args.archive
        if archive is None:
            source = args.source
            if source == "auto":
                source = "roboflow" if os.environ.get("ROBOFLOW_API_KEY") else "mirror"
            if source == "roboflow":
                key = os.environ.get("ROBOFLOW_API_KEY")
                if not key:
                    raise DownloadError("--source roboflow needs the ROBOFLOW_API_KEY environment variable")
                url = roboflow_export_url(key, args.roboflow_api, args.timeout)
            else:
                url = args.url
            archive = fetch(url, args.dest.parent / "downloads" / f"{args.dest.name}-{source}.zip", args.timeout)
        if not archive.is_file():
            raise DownloadError(f"--archive {archive}: no such file")
        if args.sha256 and sha256_of(archive) != args.sha256.lower():
            raise DownloadError(f"{archive}: SHA256 {sha256_of(archive)} differs from --sha256 {args.sha256}")
        count = extract_verified(archive, args.dest, manifest)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.dest}: {count} files extracted and verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
