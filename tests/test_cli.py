"""`kedro run --params` with list values (the project's bracket-aware splitter)."""

from __future__ import annotations

import click
import pytest

from rare_cxr.cli import split_params, split_top_level


def test_commas_inside_brackets_braces_and_quotes_belong_to_the_value():
    assert split_top_level('a=1,b.c=[64,128,256],d={x: 1, y: 2},e="p,q", f=g') == [
        "a=1",
        "b.c=[64,128,256]",
        "d={x: 1, y: 2}",
        'e="p,q"',
        "f=g",
    ]
    assert split_params(
        None, None, "training.epochs=3,multiscale_resnet.model.scales=[64,128]"
    ) == {
        "training": {"epochs": 3},
        "multiscale_resnet": {"model": {"scales": [64, 128]}},
    }
    assert split_params(None, None, {"already": "a dict"}) == {"already": "a dict"}  # --config
    assert split_params(None, None, "") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("training.epochs", "must be key=value"),
        ("=3", "must be key=value"),
        ("a=[1,2", "unclosed '\\['"),
        ("a=1]", "unbalanced"),
        ('a="open', "unclosed"),
    ],
)
def test_malformed_params_are_refused_with_the_item_named(text, message):
    with pytest.raises(click.BadParameter, match=message):
        split_params(None, None, text)
