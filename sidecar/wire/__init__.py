"""Pure parsers of wire formats (no I/O, no proxy machinery): shared by every proxy tier."""
