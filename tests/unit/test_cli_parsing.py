from __future__ import annotations

import pytest

from vmshift.cli.vms import parse_size_mib
from vmshift.errors import InvalidInputError


@pytest.mark.parametrize(
    ("text", "mib"), [("64M", 64), ("64", 64), ("2G", 2048), ("1GiB", 1024), ("512MiB", 512)]
)
def test_sizes(text: str, mib: int) -> None:
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("text", ["", "0M", "-1G", "ten", "5T"])
def test_bad_sizes_are_clear(text: str) -> None:
    with pytest.raises(InvalidInputError, match="not valid"):
        parse_size_mib(text)
