"""Error type for everything that goes wrong while finding or reading data."""


class DataError(ValueError):
    """Data is missing, unreadable or inconsistent (the message names the path involved)."""
