"""Tools built on the rest: bench, index bench, demo."""
