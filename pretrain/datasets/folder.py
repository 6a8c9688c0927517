"""Any data set laid out as `train/<class>/<image>` and `test/<class>/<image>` (torchvision's ImageFolder).

The classes are train's sub-folders, sorted; test may lack some of them but not add any.
"""
from __future__ import annotations

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from pretrain.datasets.archives import DatasetFormatError, locate
from pretrain.datasets.registry import LabeledImages, register_dataset

FOLDER_EXPECTS = "train/<class>/<image> and test/<class>/<image> (jpg, png, ...), or a .tar.gz of them"


@register_dataset("imagefolder", dev_fraction=0.1)
def imagefolder(root: str | None, split: str) -> LabeledImages:
    base = locate("imagefolder", root, "train", ("*.tar.gz", "*.tgz"), FOLDER_EXPECTS)
    if not (base / split).is_dir():
        raise DatasetFormatError(f"imagefolder: {base / split} is missing; expected {FOLDER_EXPECTS}")
    classes, class_to_idx = find_classes(str(base / "train"))
    extra = set(find_classes(str(base / split))[0]) - set(classes)
    if extra:
        raise DatasetFormatError(f"imagefolder: {base / split} has classes {sorted(extra)} that train/ lacks")
    try:
        samples = make_dataset(str(base / split), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as err:
        raise DatasetFormatError(f"imagefolder: {err}; expected {FOLDER_EXPECTS}") from None
    if not samples:
        raise DatasetFormatError(f"imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under {base / split}")
    return LabeledImages([path for path, _ in samples], np.array([c for _, c in samples], dtype=np.int64), classes)
