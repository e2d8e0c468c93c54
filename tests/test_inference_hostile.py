"""Inference against hostile input folders and bundles (issue 17, items 7 and 8).

A security review attacked `kedro run --pipelines inference --params input_dir=...`: file
names that are not UTF-8, that look like missing values or numbers (`NA`, `0001`), that a
spreadsheet runs (`=HYPERLINK(...)`), folders named like overlay files, decompression bombs,
bundle metadata that injects Markdown into the model card, malformed bundles. Each test here
builds such an input (tiny images) and checks what the user gets. The decompression bombs of
each DICOM transfer syntax are in tests/test_dicom.py.
"""

from __future__ import annotations

import copy
import csv
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile
from test_dicom import jpeg_declaring, make_dicom
from test_inference import FAST, SIZE, png, radiograph, read_predictions, tiny_bundle

from rare_cxr.datasets.inference import PngFolderDataset, PredictionsCSVDataset
from rare_cxr.findings import FINDINGS
from rare_cxr.inference.predict import overlay_name, run_inference, validate_inference_params
from rare_cxr.inference.report import render_inference_report
from rare_cxr.inference.table import (
    TEXT_COLUMNS,
    csv_load_args,
    from_csv_frame,
    neutralise,
    printable,
    restore,
    to_csv_frame,
)

NON_UTF8 = b"bad\xffname.png"  # a Latin-1 export: the byte 0xFF is not UTF-8
NON_UTF8_SHOWN = "bad\\xffname.png"
# names that pandas' defaults turn into a missing value or a number, or a spreadsheet runs
TRICKY = ("NA", "0001", "0010", "1e5", "=cmd", '=HYPERLINK("evil.example","y")', "+1", "@sum")


@pytest.fixture(scope="module")
def bundle() -> dict:
    return tiny_bundle()


def all_positive(bundle: dict) -> dict:
    """The bundle with every threshold at 0: every finding of every image is positive, so
    every image gets overlays."""
    out = copy.deepcopy(bundle)
    out["metadata"]["thresholds"] = dict.fromkeys(FINDINGS, 0.0)
    return out


def png_as(path: Path, array: np.ndarray) -> None:
    """A PNG whatever the name's extension says (names here are chosen, not descriptive)."""
    Image.fromarray(array).save(path, format="PNG")


def hostile_folder(folder: Path) -> dict[str, str]:
    """Tiny images under hostile names; returns {name as shown: format}."""
    folder.mkdir(parents=True)
    shown = {}
    for k, name in enumerate(TRICKY[:-1]):
        if name == "1e5":
            make_dicom(folder / name, radiograph(k), bits_stored=8)
            shown[name] = "dicom"
        else:
            png_as(folder / name, radiograph(k))
            shown[name] = "png"
    with open(os.path.join(os.fsencode(folder), NON_UTF8), "wb") as handle:
        Image.fromarray(radiograph(20)).save(handle, format="PNG")
    shown[NON_UTF8_SHOWN] = "png"
    png_as(folder / "tab\there.png", radiograph(21))
    shown["tab\\x09here.png"] = "png"
    png_as(folder / "rtl\u202egnp.exe", radiograph(22))  # a right-to-left override
    shown["rtl\\u202egnp.exe"] = "png"
    return shown


# --------------------------------------------------------------------- names as text


def test_printable_escapes_what_cannot_be_written_or_seen_and_nothing_else():
    assert printable(os.fsdecode(NON_UTF8)) == NON_UTF8_SHOWN
    assert printable("a\nb\x1b[31m") == "a\\x0ab\\x1b[31m"
    assert printable("rtl\u202etxt") == "rtl\\u202etxt"
    for plain in ("NA", "0001", "café.png", "x-ray 1.dcm", "=cmd", "a\\xffb"):
        assert printable(plain) == plain


def test_text_cells_are_neutralised_reversibly_and_numbers_stay_numbers():
    for cell in (*TRICKY, "-x", "\tx", "\rx", "'", "'=x", "''", "plain", ""):
        assert restore(neutralise(cell)) == cell
        assert not neutralise(cell).startswith(("=", "+", "-", "@", "\t", "\r"))
    table = pd.DataFrame(
        {"path": ["=cmd", "-1", "NA"], "Atelectasis": [-0.5, np.nan, 1e-9], "width": [1, 2, 3]}
    ).astype({"path": "string", "width": "Int64"})
    text = io.StringIO()
    to_csv_frame(table).to_csv(text, index=False)
    assert text.getvalue().splitlines() == [
        "path,Atelectasis,width",
        "'=cmd,-0.5,1",
        "'-1,,2",
        "NA,1e-09,3",
    ]
    back = from_csv_frame(pd.read_csv(io.StringIO(text.getvalue()), **csv_load_args()))
    pd.testing.assert_frame_equal(back, table)


def test_hostile_names_are_predicted_written_read_back_and_reported_as_themselves(tmp_path, bundle):
    from kedro.io import Version

    folder = tmp_path / "in"
    shown = hostile_folder(folder)
    params = {**FAST, "input_dir": str(folder)}
    table, overlays = run_inference(bundle, params)
    assert sorted(table["path"]) == sorted(shown)
    assert (table["status"] == "ok").all(), table[["path", "reason"]]
    assert dict(zip(table["path"], table["format"], strict=True)) == shown

    dataset = PredictionsCSVDataset(filepath=str(tmp_path / "p.csv"), version=Version(None, "v"))
    dataset.save(table)
    saved = tmp_path / "p.csv" / "v" / "p.csv"
    raw = saved.read_bytes()
    raw.decode("utf-8")  # the file is UTF-8 throughout
    with saved.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # a spreadsheet sees no formula in any text cell
        for column in TEXT_COLUMNS:
            assert not row[column].startswith(("=", "+", "-", "@", "\t", "\r")), row[column]
    paths = [row["path"] for row in rows]
    assert {"NA", "0001", "0010", "1e5", "'=cmd", "'+1", NON_UTF8_SHOWN} <= set(paths)
    loaded = PredictionsCSVDataset(
        filepath=str(tmp_path / "p.csv"), version=Version(None, None)
    ).load()
    assert loaded["path"].tolist() == table["path"].tolist()  # every name, as it was
    pd.testing.assert_frame_equal(loaded[list(FINDINGS)], table[list(FINDINGS)])
    assert read_predictions(saved)["path"].tolist() == table["path"].tolist()

    html = render_inference_report(
        predictions=loaded,
        overlays=overlays,
        bundle=bundle,
        cfg=validate_inference_params(params),
        input_root=str(folder),
    )
    assert "no longer readable" not in html
    assert html.count("<img alt='input'") == len(shown)  # every thumbnail found its file
    for name in ("NA", "0001", "0010", "1e5", NON_UTF8_SHOWN, "tab\\x09here.png"):
        assert f"<b>{name}</b>" in html, name
    assert "<b>=cmd</b>" in html and "&#x27;=cmd" not in html
    for wrong in ("nan", "1", "10", "100000.0", "'=cmd"):  # what pandas' defaults made of them
        assert f"<b>{wrong}</b>" not in html


def test_a_header_that_claims_more_pixels_than_allowed_is_refused_before_decoding(
    tmp_path, bundle, monkeypatch
):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bomb.jpg").write_bytes(jpeg_declaring(8000, 8000))  # 64 M px in 700 bytes
    png(folder / "fine.png", radiograph())

    def refuse(self):
        raise AssertionError("pixels of an over-limit image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    params = {**FAST, "input_dir": str(folder), "gradcam": {"enabled": False}}
    table, _ = run_inference(bundle, params)
    rows = table.set_index("path")
    assert rows.loc["bomb.jpg", "status"] == "too-large"
    assert (
        "8000x8000 = 64,000,000 pixels exceeds inference.max_image_pixels"
        in (rows.loc["bomb.jpg", "reason"])
    )
    assert rows.loc["fine.png", "status"] == "corrupt"  # load() refuses: proves it is patched


# --------------------------------------------------------------------- overlays


def test_overlay_names_are_unique_flat_and_safe_whatever_the_input_names(tmp_path, bundle):
    folder = tmp_path / "in"
    png(folder / "a.png", radiograph(1))
    for finding in FINDINGS:  # folders named as the old scheme named a.png's overlays
        for layer in ("scale_16", "scale_32"):
            png(folder / f"a.png__{finding}__{layer}.png" / "b.png", radiograph(2))
    for name in ("x y.png", "x_y.png", "x?y.png", "x\\y.png"):
        png(folder / "sub" / name, radiograph(3))
    with open(os.path.join(os.fsencode(folder), b"x\xffy.png"), "wb") as handle:
        Image.fromarray(radiograph(4)).save(handle, format="PNG")

    table, overlays = run_inference(all_positive(bundle), {**FAST, "input_dir": str(folder)})
    assert (table["status"] == "ok").all()
    per_image = 3 * 2  # max_findings_per_image x scales
    assert len(overlays) == len(table) * per_image  # no two overlays share a name
    listed = [name for cell in table["overlays"] for name in cell.split("|")]
    assert sorted(listed) == sorted(overlays)
    for number, row in table.iterrows():
        names = row["overlays"].split("|")
        assert len(names) == per_image
        assert all(name.startswith(f"{number + 1:06d}_") for name in names)
    for name in overlays:
        assert "/" not in name and not name.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name), name

    target = PngFolderDataset(str(tmp_path / "overlays"))
    target.save(overlays)  # the save that used to crash
    written = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert written == sorted(overlays)
    with Image.open(tmp_path / "overlays" / written[0]) as image:
        assert image.size == (SIZE, SIZE)
    expected = "000007_x_y.png__Mass__scale_32.png"
    assert overlay_name(7, "sub/x?y.png", "Mass", "scale_32") == expected


# --------------------------------------------------------------------- documents


INJECTED = "x\n# Approved for clinical use\n![pixel](http://evil.example/p.png) [site](http://evil.example)"


def injected_bundle(bundle: dict) -> dict:
    """Every free-text metadata value the card shows, set to Markdown/HTML that would add a
    heading, an external image, a link, raw HTML or table cells if it were interpreted."""
    out = copy.deepcopy(bundle)
    meta = out["metadata"]
    meta["model"] = INJECTED
    meta["created_by"] = "<img src=http://evil.example/q.png>"
    meta["threshold_method"] = "f1` ![m](http://evil.example/m.png) `"
    meta["model_spec"]["backbone"] = "| evil | cells |"
    meta["preprocessing"]["grey"] = "## Approved\n> quoted"
    meta["data"]["source"] = INJECTED + " <script>alert(1)</script>"
    meta["data"]["splits"][0]["split"] = "1. [x](javascript:alert(1))"
    meta["rare_findings"]["rule"] = "<b>bold</b> &amp; **strong**"
    meta["subgroups"][0]["subgroup"] = "-\n=== "
    # issue 20's sections: subgroup names and numbers that are text, calibration fields
    meta["underdiagnosis"][0]["subgroup"] = INJECTED
    meta["underdiagnosis"][0]["underdiagnosis_rate"] = "![u](http://evil.example/u.png)"
    meta["calibration"]["binning"] = "[c](http://evil.example)"
    meta["calibration"]["split"] = "`x` <img src=http://evil.example/s.png>"
    meta["calibration"]["test_ece"]["Mass"]["raw"] = "<img src=http://evil.example/e.png>"
    meta["calibration"]["test_ece"]["macro"]["calibrated"] = "[m](http://evil.example)"
    return out


def test_bundle_metadata_is_rendered_as_plain_text_in_the_card_and_the_report(tmp_path, bundle):
    from markdown_it import MarkdownIt

    from rare_cxr.inference.model_card import card_html, card_markdown

    hostile = injected_bundle(bundle)
    card = card_markdown(hostile["metadata"])
    headings = [line for line in card.splitlines() if line.startswith("#")]
    assert headings == [
        "# Model card — x # Approved for clinical use \\!\\[pixel\\](http://evil.example/p.png)"
        " \\[site\\](http://evil.example)",
        *(
            f"## {title}"
            for title in (
                "Intended use",
                "Model",
                "Data",
                "Metrics (test split)",
                "Decision thresholds and what a probability means",
                "Limitations",
                "Citations",
            )
        ),
    ]
    rendered = card_html(card)
    for html in (rendered, MarkdownIt("commonmark").render(card)):  # also a stricter renderer
        assert "evil.example" in html  # shown, as text ...
        assert "<img" not in html and "<a " not in html and "<script" not in html
        assert "<b>bold" not in html and "<blockquote>" not in html and "<ol" not in html
        assert "Approved for clinical use" in html
        for tag in ("h1", "h2", "h3"):
            assert f"<{tag}>Approved" not in html and f"<{tag}>x" not in html
    # each value whole, in its own cell or sentence, whitespace collapsed
    for text in ("<td>| evil | cells |</td>", "&lt;b&gt;bold&lt;/b&gt; &amp;amp; **strong**"):
        assert text in rendered, text
    assert "<td>- ===</td>" in rendered
    assert rendered.count("<table>") == card_html(card_markdown(bundle["metadata"])).count(
        "<table>"
    )  # no table added, none broken

    folder = tmp_path / "in"
    png(folder / "a.png", radiograph())
    params = {**FAST, "input_dir": str(folder)}
    table, overlays = run_inference(bundle, params)  # (the hostile spec builds no model)
    page = render_inference_report(
        predictions=table,
        overlays=overlays,
        bundle=hostile,
        cfg=validate_inference_params(params),
        input_root=str(folder),
    )
    assert "evil.example" in page
    for bad in ("<img src=http", "<img src='http", '<img src="http', "<a ", "<script"):
        assert bad not in page
    flat = " ".join(page.split())  # HTML: a newline in text is a space
    assert "<title>rare-cxr inference — x # Approved for clinical use ![pixel]" in flat
    assert "<h1>Inference — x # Approved" in flat  # the model name, in the page's own heading
    assert "<h2>Approved" not in page and "<h3>Approved" not in page


# --------------------------------------------------------------------- malformed bundles


def _set(path: str, value):
    """A mutation of the bundle: `metadata.a.b` or `state_dict.<name>` set to `value`
    (`DROP` removes the key)."""

    def mutate(bundle: dict) -> None:
        *parents, leaf = path.split(".", 1) if path.startswith("state_dict") else path.split(".")
        node = bundle
        for part in parents:
            node = node[part]
        if value is DROP:
            del node[leaf]
        else:
            node[leaf] = value(node[leaf]) if callable(value) else value

    return mutate


DROP = object()
FIRST_WEIGHT = "trunks.0.conv1.weight"
MALFORMED = {
    "input size 0": (_set("metadata.input_size", 0), "metadata.input_size: expected a value >= 1"),
    "input size huge": (
        _set("metadata.input_size", 10**6),
        "metadata.input_size: expected a value <= 4096, got 1000000",
    ),
    "threshold abc": (
        _set("metadata.thresholds.Mass", "abc"),
        "metadata.thresholds.Mass: expected a number, got 'abc'",
    ),
    "threshold above 1": (
        _set("metadata.thresholds.Edema", 1.5),
        "metadata.thresholds.Edema: expected a value <= 1.0, got 1.5",
    ),
    "threshold missing": (
        _set("metadata.thresholds.Mass", DROP),
        "metadata.thresholds: expected one threshold per finding; missing ['Mass']",
    ),
    "key missing": (_set("metadata.scales", DROP), "metadata.scales: required key is missing"),
    "scale above the input": (
        _set("metadata.input_size", 16),
        "metadata.scales: [16, 32] exceed input_size 16 (the model input)",
    ),
    "unknown architecture": (
        _set("metadata.model_spec.architecture", "evil"),
        "metadata.model_spec.architecture: expected one of 'multiscale_resnet'",
    ),
    "flip not a bool": (
        _set("metadata.preprocessing.tta_hflip", "yes"),
        "metadata.preprocessing.tta_hflip: expected true or false, got 'yes'",
    ),
    "weights of another shape": (
        _set(f"state_dict.{FIRST_WEIGHT}", lambda t: t[:, :, :3, :3].clone()),
        f"state_dict does not fit metadata.model_spec (architecture 'multiscale_resnet', "
        f"backbone 'resnet18', scales [16, 32]): 1 shape mismatch(es): '{FIRST_WEIGHT}: "
        "[64, 1, 3, 3] in the bundle, [64, 1, 7, 7] in the model'",
    ),
    "weights of another backbone": (
        _set("metadata.model_spec.backbone", "resnet34"),
        "state_dict does not fit metadata.model_spec (architecture 'multiscale_resnet', "
        "backbone 'resnet34', scales [16, 32]): missing 96 key(s)",
    ),
    "weight missing": (
        _set(f"state_dict.{FIRST_WEIGHT}", DROP),
        f"missing 1 key(s) '{FIRST_WEIGHT}'",
    ),
    "not a tensor": (
        _set(f"state_dict.{FIRST_WEIGHT}", [1.0, 2.0]),
        f"state_dict values of '{FIRST_WEIGHT}' are not tensors",
    ),
    "other normalisation": (
        _set("metadata.normalisation.mean", 0.5),
        "metadata.normalisation.mean is 0.5, but this rare-cxr feeds mean=0.449",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_bundle_is_refused_naming_the_file_and_the_key(tmp_path, bundle, case):
    import torch
    from kedro.io import DatasetError

    from rare_cxr.datasets.inference import ModelBundleDataset

    mutate, message = MALFORMED[case]
    broken = copy.deepcopy(bundle)
    mutate(broken)
    path = tmp_path / "shared" / "model_bundle.pt"
    path.parent.mkdir()
    torch.save(broken, path)
    torch.load(path, weights_only=True)  # a plain bundle: only its content is wrong
    with pytest.raises(DatasetError) as caught:
        ModelBundleDataset(str(path)).load()
    assert str(caught.value).startswith(f"{path}: "), str(caught.value)
    assert message in str(caught.value)


def test_a_bundle_at_inceptions_minimum_input_above_a_small_cache_loads(bundle):
    """Training lets Inception-v3 upsample a small cache to its 75 px minimum (with a warning,
    `check_scales_fit_cache`); the bundle it makes must then validate -- the CLI run of the
    user guide's CPU configuration once died saving it. 76 px is still refused."""
    from rare_cxr.inference.bundle import BundleError, validate_bundle

    inception = copy.deepcopy(bundle)
    meta = inception["metadata"]
    meta["model_spec"] = {**meta["model_spec"], "architecture": "inception_v3", "scales": [75]}
    meta["model_spec"].pop("backbone", None)
    meta.update(scales=[75], input_size=32)
    validate_bundle(inception, "inception.pt", check_weights=False)
    meta["scales"] = [76]
    with pytest.raises(BundleError, match=r"inception.pt: metadata.scales: \[76\] exceed"):
        validate_bundle(inception, "inception.pt", check_weights=False)


# --------------------------------------------------------------------- the real command line


@pytest.mark.slow
def test_hostile_folder_and_bundles_through_the_kedro_command_line(tmp_path, bundle):
    """`kedro run --pipelines inference --params bundle=...,input_dir=...` on a folder of
    hostile names, a deflate bomb and a folder named like an overlay file: the run finishes,
    predictions.csv on disk holds every name as text (neutralised against CSV injection), the
    report shows every name as it is, and a malformed bundle stops the run naming file and key."""
    import torch
    from conftest import make_project
    from test_dicom import deflated_dicom

    from rare_cxr.datasets.inference import ModelBundleDataset

    project = make_project(tmp_path / "project")
    project.write_local_params({"inference.device": "cpu", "inference.progress_bar": False})
    bundle_file = tmp_path / "shared" / "model_bundle.pt"
    ModelBundleDataset(str(bundle_file)).save(all_positive(bundle))
    images = tmp_path / "images"
    shown = hostile_folder(images)
    deflated_dicom(images / "bomb.dcm", 24 * 2**20)  # inflates past the 16 MiB allowance
    png(images / "000001_NA__Mass__scale_16.png" / "x.png", radiograph(30))

    done = project.cli("run", "--pipelines", "inference", "--params",
                       f"bundle={bundle_file},input_dir={images}")  # fmt: skip
    assert "Pipeline execution completed successfully" in done.stdout + done.stderr
    data = project.data()
    saved = sorted(data.glob("07_model_output/inference/predictions.csv/*/predictions.csv"))[-1]
    with saved.open(newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    on_disk = {
        "NA",
        "0001",
        "0010",
        "1e5",
        "'=cmd",
        '\'=HYPERLINK("evil.example","y")',
        "'+1",
        NON_UTF8_SHOWN,
        "tab\\x09here.png",
        "rtl\\u202egnp.exe",
    }
    assert set(rows) == on_disk | {"bomb.dcm", "000001_NA__Mass__scale_16.png/x.png"}
    assert {p: rows[p]["status"] for p in on_disk} == dict.fromkeys(on_disk, "ok")
    assert rows["bomb.dcm"]["status"] == "too-large"
    assert "deflated dataset inflates beyond" in rows["bomb.dcm"]["reason"]
    table = read_predictions(saved)  # read as text, then typed: every name as it was
    assert set(table["path"]) == set(shown) | {"bomb.dcm", "000001_NA__Mass__scale_16.png/x.png"}
    overlays = sorted(data.glob("08_reporting/inference/overlays/*/overlays"))[-1]
    listed = [n for cell in table["overlays"] for n in cell.split("|") if n]
    assert sorted(listed) == sorted(p.name for p in overlays.iterdir())
    assert len(listed) == 6 * (len(shown) + 1)  # 3 findings x 2 scales per predicted image

    html = sorted(data.glob("08_reporting/inference/inference_report.html/*/*.html"))[-1]
    page = html.read_text(encoding="utf-8")
    assert "no longer readable" not in page
    assert page.count("<img alt='input'") == len(shown) + 1
    for name in ("NA", "0001", "0010", "1e5", "=cmd", NON_UTF8_SHOWN, "rtl\\u202egnp.exe"):
        assert f"<b>{name}</b>" in page, name
    for wrong in ("nan", "1", "10", "100000.0", "'=cmd"):
        assert f"<b>{wrong}</b>" not in page

    broken = copy.deepcopy(bundle)
    broken["metadata"]["thresholds"]["Mass"] = "abc"
    bad_file = tmp_path / "shared" / "broken_bundle.pt"
    torch.save(broken, bad_file)
    failed = project.cli("run", "--pipelines", "inference", "--params",
                         f"bundle={bad_file},input_dir={images}", check=False)  # fmt: skip
    assert failed.returncode != 0
    output = " ".join((failed.stdout + failed.stderr).split())  # rich wraps long lines
    assert f"{bad_file}: metadata.thresholds.Mass: expected a number, got 'abc'" in output


@pytest.mark.parametrize(
    "value",
    [
        "# Approved for clinical use",
        "x\n# Approved\n\n> quoted\n\n    code",
        "![pixel](http://evil.example/p.png)",
        "[site](http://evil.example) <http://evil.example>",
        "<img src=x onerror=alert(1)> <b>bold</b> &amp;",
        "| a | b |",
        "1. one",
        "12) twelve",
        "- item",
        "+ item",
        "* item",
        "=== ",
        "---",
        "```fence",
        "~~strike~~ **strong** _em_ `code`",
        "a\\b \\*",
        "[ref]: http://evil.example",
    ],
)
def test_a_markdown_escaped_value_renders_as_exactly_its_text(value):
    """The card's escaping, alone: rendered as a whole document by markdown-it (CommonMark and
    the js-default preset the reports use), an escaped value is one paragraph of its own text
    (whitespace collapsed); as a code span, one code element."""
    import html

    from markdown_it import MarkdownIt

    from rare_cxr.inference.templating import md_code, md_escape

    text = " ".join(value.split())
    for preset in ("commonmark", "js-default"):
        renderer = MarkdownIt(preset)
        assert renderer.render(md_escape(value)) == f"<p>{html.escape(text, quote=False)}</p>\n"
        assert renderer.render(f"x {md_code(value)}") == (
            f"<p>x <code>{html.escape(text, quote=False)}</code></p>\n"
        )
