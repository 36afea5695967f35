"""The metadata index: the only code that speaks SQL (schema, migrations, named queries)."""

from artifactfs.index.db import Index, InodeRow
from artifactfs.index.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Index", "InodeRow"]
