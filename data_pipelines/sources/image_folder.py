"""Image folders, a class per folder: ROOT/<class>/* or, with splits, ROOT/<split>/<class>/*.

ROOT is a local folder or a bucket prefix (gs://, s3://; see storage.py); an image's key is its path
relative to ROOT, so a copy of a folder in a bucket gives the same image ids as the folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

from etils import epath

from data_pipelines import storage
from data_pipelines.sources.base import (
    DEFAULT_CHANNELS,
    SPLIT_ALIASES,
    Frame,
    Item,
    Source,
)
from data_pipelines.sources.image_files import IMAGE_EXTENSIONS, load_image_file


def _images_under(folder: epath.Path) -> list[epath.Path]:
    return [p for p in storage.files_under(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


class ImageFolderSource(Source):
    """Single-label images named by their folder. Top folders named train/val(id)/test are splits."""

    def __init__(self, root: str | os.PathLike, *, modality: str, channels: int | None = None):
        self.root = storage.path(root)
        self.modality = modality
        self.channels = channels or DEFAULT_CHANNELS[modality]
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a directory")
        tops = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not tops:
            raise ValueError(f"{self.root}: no class folders")
        self._split_layout = all(t.lower() in SPLIT_ALIASES for t in tops)
        if self._split_layout:
            classes = {c.name for t in tops for c in (self.root / t).iterdir() if c.is_dir()}
        else:
            classes = set(tops)
        self.label_names = tuple(sorted(classes))

    def items(self) -> list[Item]:
        index = {name: i for i, name in enumerate(self.label_names)}
        splits = sorted(p for p in self.root.iterdir() if p.is_dir()) if self._split_layout else [self.root]
        items = []
        for split_dir in splits:
            split = SPLIT_ALIASES[split_dir.name.lower()] if self._split_layout else None
            for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                for path in _images_under(class_dir):
                    key = path.relative_to(self.root).as_posix()
                    items.append(Item(key=key, labels=(index[class_dir.name],), split=split, ref=path))
        return items

    def load(self, item: Item) -> Iterator[Frame]:
        yield load_image_file(item.ref, self.channels)
