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


@pytest.mark.parametrize("key", ["copy_threads", "staging_mib", "staging_slots"])
def test_counts_must_be_positive_integers(tmp_path, key):
    with pytest.raises(ValueError, match=rf"{key} must be a positive integer"):
        ConnectorConfig.from_extra({"store": str(tmp_path), key: 0})


def test_streaming_stores_is_unset_unless_given(tmp_path):
    """Unset leaves the page path's own default; any spelling of false turns it off."""
    assert ConnectorConfig.from_extra({"store": str(tmp_path)}).streaming_stores is None
    for value, expected in ((True, True), ("false", False), (0, False), ("no", False)):
        config = ConnectorConfig.from_extra({"store": str(tmp_path), "streaming_stores": value})
        assert config.streaming_stores is expected


def test_staging_slots_reach_the_staged_path(tmp_path):
    import torch
    from processfork.plugin.codec import codec_for
    from processfork.plugin.staged_pages import StagedPagePath, staging_options

    config = ConnectorConfig.from_extra({"store": str(tmp_path), "staging_mib": 4,
                                         "staging_slots": 8, "streaming_stores": False})
    layers = [torch.zeros(4, 2, 32, 64, dtype=torch.float16) for _ in range(2)]
    codec = codec_for("CPU_ATTN", layers, head_dim=32)
    path = StagedPagePath(codec, verify=True, **staging_options(
        config.staging_mib, config.staging_slots, config.streaming_stores))
    try:
        assert len(path._slots) == 8
        assert path.staging_bytes <= 4 << 20
        assert path.streaming_stores is False
    finally:
        path.close()
