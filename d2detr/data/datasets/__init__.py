"""Built-in real datasets, registered in Detectron2's catalogs on import.

``neon_trees_train`` / ``neon_trees_val``: NEON tree crowns from the ``deepforest``
package, tiled 400x400 and split by image region (see docs/datasets.md).
Registration is lazy: no file is read until ``DatasetCatalog.get(name)``.
"""

from .neon_trees import (
    CLASS_NAMES,
    SOURCES,
    default_cache_dir,
    load_neon_trees,
    locate_deepforest_data,
    prepare_neon_trees,
    read_box_annotations,
    register_neon_trees,
)

__all__ = [
    "CLASS_NAMES",
    "SOURCES",
    "default_cache_dir",
    "load_neon_trees",
    "locate_deepforest_data",
    "prepare_neon_trees",
    "read_box_annotations",
    "register_neon_trees",
]

register_neon_trees()  # builtin: neon_trees_train, neon_trees_val (deepforest's data folder)
