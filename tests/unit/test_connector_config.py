"""What ``kv_connector_extra_config`` accepts: a bad value stops the engine at start with a
message naming the key, never a silent default."""

from __future__ import annotations

import pytest
from processfork.plugin.connector_config import PAGE_READERS, ConnectorConfig


def test_page_reader_defaults_to_auto_and_takes_each_named_reader(tmp_path):
    assert ConnectorConfig.from_extra({"store": str(tmp_path)}).page_reader == "auto"
    for reader in PAGE_READERS:
        config = ConnectorConfig.from_extra({"store": str(tmp_path), "page_reader": reader})
        assert config.page_reader == reader


@pytest.mark.parametrize("value", ["mmap", "MAP", 1])
def test_an_unknown_page_reader_is_an_error_that_names_the_choices(tmp_path, value):
    with pytest.raises(ValueError, match=r"page_reader must be one of auto, map, pread"):
        ConnectorConfig.from_extra({"store": str(tmp_path), "page_reader": value})


@pytest.mark.parametrize("key", ["copy_threads", "staging_mib"])
def test_counts_must_be_positive_integers(tmp_path, key):
    with pytest.raises(ValueError, match=rf"{key} must be a positive integer"):
        ConnectorConfig.from_extra({"store": str(tmp_path), key: 0})
