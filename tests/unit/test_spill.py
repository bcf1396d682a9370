"""Spill areas: a killed server's area is removed at the next start, a live one never."""

from __future__ import annotations

from teepsi.engine.spill import SpillArea


def test_a_closed_area_leaves_nothing(tmp_path):
    area = SpillArea(tmp_path)
    area.write(b"x", b"l")
    area.close()
    area.close()
    assert list(tmp_path.iterdir()) == []
