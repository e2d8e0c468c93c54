"""kedro-viz previews for the project's own datasets (`kedro viz build --include-previews`).

kedro-viz calls a dataset's `preview(**preview_args)` and renders it by the method's return
annotation (`kedro_datasets._typing`: TablePreview, ImagePreview, JSONPreview, HTMLPreview).
kedro-datasets gives its CSV/Parquet/JSON/Matplotlib datasets previews; the datasets written
here (image folder, image cache, checkpoint, training state, text/HTML, raw label files) get
theirs from the helpers below, so the lineage view shows the films, the report and the
checkpoint metadata, not only tables. Previews are read-only and small (a contact sheet of a
few thumbnails, the first rows of a table), and never load model weights into a model.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

THUMBNAIL_PX = 128


def contact_sheet_png_base64(images: Sequence[np.ndarray], columns: int = 4) -> str:
    """Grey uint8 images side by side (each resized to THUMBNAIL_PX), as base64 PNG.

    Hand-written because a preview must not need matplotlib figures (kept for reports) nor
    torchvision's `make_grid` on tensors: this is a few lines of Pillow on uint8 arrays.
    """
    if not images:
        raise ValueError("no images to preview")
    tiles = [
        Image.fromarray(np.asarray(image, dtype=np.uint8))
        .convert("L")
        .resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR)
        for image in images
    ]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("L", (columns * THUMBNAIL_PX, rows * THUMBNAIL_PX), color=0)
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * THUMBNAIL_PX, (index // columns) * THUMBNAIL_PX))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def text_as_html(text: str, is_html: bool) -> str:
    """HTML as is; any other text escaped in a <pre> block (markdown tables, id lists)."""
    return text if is_html else f"<pre>{html.escape(text)}</pre>"


def json_text(data: Any) -> str:
    """kedro-viz's JSONPreview is a JSON *string*."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)
