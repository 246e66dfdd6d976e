"""Old name of ``edgecloud.deps``, kept while branches that still import it merge (#10)."""

from edgecloud.deps import available, require

__all__ = ["available", "require"]
