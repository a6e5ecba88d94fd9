"""What an import produced: our arrays, and a report of what did and did not match.

Imports are partial by design (a DINO file has no MaSSL head, a timm file carries a classifier
we do not use), so the result says exactly which tensors were loaded, which of ours kept their
initialisation, and which of the file's were left unused, instead of failing or staying silent.
"""

import dataclasses

import numpy as np

from mermed_jax.interop.trees import Path


@dataclasses.dataclass
class ImportReport:
    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # ours, absent from the file: kept at init
    unexpected: list[str] = dataclasses.field(default_factory=list)  # the file's, unused
    mismatched: list[str] = dataclasses.field(default_factory=list)  # head tensors whose shapes do not fit
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for title, names in (("missing (kept at initialisation)", self.missing),
                             ("unexpected (unused)", self.unexpected),
                             ("shape does not fit (kept at initialisation)", self.mismatched)):
            if names:
                lines.append(f"  {title}: {len(names)}")
                lines.extend(f"    {name}" for name in names)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclasses.dataclass
class ImportedWeights:
    """Arrays in our layout keyed by unrolled path; the head's params and BatchNorm statistics apart."""

    backbone: dict[Path, np.ndarray]
    head_params: dict[Path, np.ndarray]
    head_stats: dict[Path, np.ndarray]
    report: ImportReport
