"""Where user-supplied data files are looked for."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


def data_root(root: Optional[PathLike] = None) -> Path:
    """``root`` if given, else ``$UNLEARN_EXT_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("UNLEARN_EXT_DATA", "data")).expanduser()

