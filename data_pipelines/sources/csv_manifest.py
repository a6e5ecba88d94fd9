"""A CSV manifest: one row per image with its path, labels and optionally split and patient id.

Multi-label rows list several labels in one cell ("Effusion|Mass"); a `none_value` such as
"No Finding" means no label. Paths are relative to `root`, optionally through a format string
("images/{}.jpg") for CSVs that hold bare image names. The CSV and the images may be local or in a
bucket (gs://, s3://; see storage.py).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence

from data_pipelines import storage
from data_pipelines.sources.base import (
    DEFAULT_CHANNELS,
    SPLIT_ALIASES,
    Frame,
    Item,
    Source,
)
from data_pipelines.sources.image_files import load_image_file


class CsvSource(Source):
    def __init__(
        self,
        csv_path: str | os.PathLike,
        *,
        modality: str,
        root: str | os.PathLike | None = None,
        path_column: str = "path",
        path_format: str = "{}",
        label_column: str = "label",
        multi_label: bool = False,
        label_sep: str = "|",
        none_value: str | None = None,
        label_names: Sequence[str] | None = None,
        split_column: str | None = None,
        patient_column: str | None = None,
        channels: int | None = None,
    ):
        self.csv_path = storage.path(csv_path)
        self.root = storage.path(root) if root is not None else self.csv_path.parent
        self.modality = modality
        self.channels = channels or DEFAULT_CHANNELS[modality]
        self.multi_label = multi_label
        self._columns = dict(path=path_column, label=label_column, split=split_column, patient=patient_column)
        self._path_format = path_format
        self._label_sep = label_sep
        self._none_value = none_value
        rows = self._rows()
        found = sorted({name for row in rows for name in self._label_strings(row)})
        if label_names is None:
            self.label_names = tuple(found)
        else:
            self.label_names = tuple(label_names)
            unknown = sorted(set(found) - set(self.label_names))
            if unknown:
                raise ValueError(f"{self.csv_path}: labels {unknown} not in the given label names")

    def _rows(self) -> list[dict[str, str]]:
        with io.StringIO(storage.read_text(self.csv_path), newline="") as f:
            reader = csv.DictReader(f)
            wanted = [c for c in self._columns.values() if c is not None]
            missing = [c for c in wanted if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{self.csv_path}: missing columns {missing}; has {reader.fieldnames}")
            return list(reader)

    def _label_strings(self, row: dict[str, str]) -> list[str]:
        cell = row[self._columns["label"]].strip()
        values = cell.split(self._label_sep) if self.multi_label else [cell]
        return [v.strip() for v in values if v.strip() and v.strip() != self._none_value]

    def items(self) -> list[Item]:
        index = {name: i for i, name in enumerate(self.label_names)}
        items = []
        for line, row in enumerate(self._rows(), start=2):
            split = None
            if self._columns["split"] is not None:
                value = row[self._columns["split"]].strip().lower()
                if value not in SPLIT_ALIASES:
                    raise ValueError(f"{self.csv_path}:{line}: unknown split {value!r}")
                split = SPLIT_ALIASES[value]
            relative = self._path_format.format(row[self._columns["path"]].strip())
            labels = tuple(sorted({index[name] for name in self._label_strings(row)}))
            if not self.multi_label and len(labels) != 1:
                raise ValueError(f"{self.csv_path}:{line}: single-label row without a label")
            group = row[self._columns["patient"]].strip() if self._columns["patient"] else None
            items.append(Item(key=relative, labels=labels, split=split, group=group or None, ref=self.root / relative))
        return items

    def load(self, item: Item) -> Iterator[Frame]:
        yield load_image_file(item.ref, self.channels)
