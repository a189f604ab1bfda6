"""The one override of Faust's private consumer loop refuses a release it was not written
for, loudly, at start-up."""

from __future__ import annotations

import faust
import pytest

from streams import faust_bulk


def test_the_installed_faust_streaming_is_one_the_override_was_written_for() -> None:
    faust_bulk.check_version(faust.__version__)


def test_another_release_is_refused_with_what_to_do() -> None:
    with pytest.raises(faust_bulk.UnsupportedFaust) as refused:
        faust_bulk.check_version("0.16.0")
    assert "0.16.0" in str(refused.value) and "CLIPSTREAM_BULK_LEARN=0" in str(refused.value)
