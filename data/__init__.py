"""Dataset builders per task: read and validate files, tokenise with `datasets`, and the stateful sampler."""

from recipebox.data.text import DataError

__all__ = ["DataError"]
