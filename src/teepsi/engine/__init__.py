"""Reading, normalising and intersecting item sets."""
