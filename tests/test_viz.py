"""kedro-viz lineage: build the static site and render it in a real headless Chromium.

Checks what a reader sees: the pipeline selector lists the project's pipelines, and the graph
shows reporting nodes and the collapsed per-model namespace. Chromium comes from the
distribution (`scripts/ensure_chromium.sh`, run by `make test`); without it this test skips
with the reason, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=15000",
    "--window-size=1400,900",
]


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = (
        "headless Chromium not found (tried " + ", ".join(BROWSERS) + "); install it with "
        "`sudo apt-get install -y chromium` or run `make test` as root"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " -- required when CI=true")
    pytest.skip(reason)


def kedro_viz_build(project: Path) -> Path:
    kedro = Path(sys.executable).with_name("kedro")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
    done = subprocess.run(
        [str(kedro), "viz", "build"],
        check=False,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"kedro viz build failed:\n{done.stdout}\n{done.stderr}"
    build = project / "build"
    assert (build / "index.html").is_file() and (build / "api" / "main").is_file()
    return build


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `folder` on 127.0.0.1 (the app fetches api/* JSON, which file:// would block)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/index.html"


def rendered_text(browser: str, url: str, profile: Path) -> str:
    done = subprocess.run(
        [browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"chromium failed: {done.stderr[-2000:]}"
    dom = re.sub(r"<(style|script)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
def test_kedro_viz_renders_pipelines_and_nodes(kedro_project, tmp_path):
    browser = find_browser()
    build = kedro_viz_build(kedro_project.path)
    server, url = serve(build)
    try:
        text = rendered_text(browser, url, tmp_path / "chrome-profile")
    finally:
        server.shutdown()
    assert "Kedro-Viz" in text
    # The pipeline selector: every registered pipeline by its user-facing name.
    for pipeline in ("__default__", "reporting", "baselines", "training", "nih"):
        assert re.search(rf"\b{pipeline}\b", text), f"pipeline {pipeline!r} not rendered"
    # Nodes of the default flow, and the multi-scale model's namespace collapsed into one box.
    for node in ("render_report", "build_table1", "combine_metrics", "multiscale_resnet"):
        assert node in text, f"node {node!r} not rendered"
    for dataset in ("table1", "report_html", "multiscale_resnet.metrics"):
        assert dataset in text, f"dataset {dataset!r} not rendered"


@pytest.mark.slow
def test_viz_build_with_previews_shows_the_projects_own_datasets(tiny_default_run):
    """`kedro viz build --include-previews` (README) previews the project's own datasets: the
    films and the image cache as pictures, the report as HTML, a checkpoint's metadata, the raw
    label table -- not only kedro-datasets' tables."""
    done = tiny_default_run.cli("viz", "build", "--include-previews", timeout=300)
    said = re.sub(r"\s+", " ", done.stdout + done.stderr)
    assert "circular dependency" not in said, "kedro-viz disabled the layer view"
    # Only datasets this run did not produce may lack a preview: the baselines it did not
    # train and the on-demand inference / ONNX outputs.
    not_run = ("vgg16.", "inception_v3.", "densenet121.", "efficientnet_b0.", "inference_")
    not_run += ("onnx_", "model_bundle_file")
    failed = re.findall(r"'([\w.]+)' could not be previewed", said)
    assert [name for name in failed if not name.startswith(not_run)] == [], said[-3000:]
    nodes = {}
    for path in (tiny_default_run.path / "build" / "api" / "nodes").iterdir():
        node = json.loads(path.read_text())
        if node.get("preview_type"):
            name = node.get("filepath") or path.name
            nodes[name] = node
    by_type: dict[str, list[dict]] = {}
    for node in nodes.values():
        by_type.setdefault(node["preview_type"], []).append(node)

    def find(kind: str, needle: str) -> dict:
        hits = [n for n in by_type.get(kind, []) if needle in json.dumps(n.get("filepath"))]
        assert hits, f"no {kind} for {needle}; previews: {sorted(nodes)}"
        return hits[0]

    for needle in ("01_raw/phantom", "05_model_input/image_cache"):
        image = base64.b64decode(find("ImagePreview", needle)["preview"])
        assert image.startswith(b"\x89PNG"), needle
    report = find("HTMLPreview", "report.html")["preview"]
    assert "<html" in report.lower() and "Table 1" in report
    metadata = json.loads(find("JSONPreview", "checkpoint.pt")["preview"])
    assert metadata["model_spec"]["architecture"] in {"multiscale_resnet", "resnet_single_scale"}
    labels = find("TablePreview", "Data_Entry_2017")["preview"]
    assert "Finding Labels" in labels["columns"] and len(labels["data"]) == 5
