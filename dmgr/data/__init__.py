"""Data for dmgr: the procedural PCB domain (boards, six defect classes, exact masks), folder exports,
importers for your own images and Pascal VOC boxes, and torch datasets over the exported folders.

Nothing here imports the sampler. The exporters, importers and torch datasets load on first use, so
`python -m dmgr.data.export` runs cleanly and generating boards does not import torch.
"""

from importlib import import_module

from dmgr.data.pcb import CLASS_NAMES, Board, Mark, Pad, Trace, add_defect, class_id_of, make_board

_LAZY = {
    "export_all": "export", "export_global": "export", "export_local": "export", "export_test": "export",
    "patch_window": "export", "PKU_CLASS_MAP": "importers", "import_image_folder": "importers",
    "import_voc": "importers", "import_coco": "importers", "import_masked": "patches",
    "ImageFolderDataset": "dataset", "PatchDataset": "dataset",
}

__all__ = ["CLASS_NAMES", "Board", "Mark", "Pad", "Trace", "add_defect", "class_id_of", "make_board",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"dmgr.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dmgr.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
