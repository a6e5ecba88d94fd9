"""CT intensity windows: Hounsfield units to uint8 channels, one channel per window.

CT is stored as uint8 after windowing (a 12-bit HU range does not fit 8 bits, and the model sees
windows anyway); the windows go into the manifest so the mapping can be reproduced.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.manifest import Window
from data_pipelines.sources.base import SourceError

# Common radiology presets (level, width) in HU.
PRESETS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("brain", 40, 80),
        Window("subdural", 75, 215),
        Window("abdomen", 40, 400),
        Window("liver", 60, 150),
        Window("mediastinum", 50, 350),
        Window("lung", -600, 1500),
        Window("bone", 400, 1800),
    )
}
DEFAULT_WINDOWS = ("abdomen", "lung", "bone")


def parse_windows(spec: str) -> tuple[Window, ...]:
    """Windows from a comma list of preset names or LEVEL:WIDTH pairs, e.g. "abdomen,lung,-600:1500"."""
    windows = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in PRESETS:
            windows.append(PRESETS[part])
            continue
        try:
            level, width = (float(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(
                f"window {part!r}: expected a preset ({', '.join(PRESETS)}) or LEVEL:WIDTH"
            ) from None
        if width <= 0:
            raise ValueError(f"window {part!r}: width must be positive")
        windows.append(Window(part, level, width))
    return check_windows(tuple(windows))


def check_windows(windows: tuple[Window, ...]) -> tuple[Window, ...]:
    """Windows become PNG channels, and PNG stores grey or RGB: so one window or three."""
    if len(windows) not in (1, 3):
        raise ValueError(f"{len(windows)} CT windows given; give 1 or 3 (stored as grey or RGB PNG channels)")
    return windows


def apply_windows(hu: np.ndarray, windows: tuple[Window, ...]) -> np.ndarray:
    """HxW HU (float) -> HxWxlen(windows) uint8: round((hu - (level - width/2)) * 255 / width), clipped.

    Non-finite HU (NaN for masked voxels in float volumes, inf from a damaged rescale) has no uint8
    value: the cast is undefined and gave a silent 0, so it is refused instead.
    """
    hu = np.asarray(hu, np.float64)
    if not np.isfinite(hu).all():
        raise SourceError("non-finite HU values", f"{int(np.size(hu) - np.isfinite(hu).sum())} voxels")
    channels = [
        np.clip(np.rint((hu - (w.level - w.width / 2)) * 255.0 / w.width), 0, 255) for w in windows
    ]
    return np.stack(channels, axis=-1).astype(np.uint8)
