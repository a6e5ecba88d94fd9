"""The seven imaging modalities of MerMED-FM and their integer ids.

Ids are stable: they are stored in TFRecord shards, in the memory queue (where -1 marks an
initial random row) and in checkpoints, so new modalities are only ever appended.
"""

MODALITIES: tuple[str, ...] = ("ct", "cxr", "us", "path", "cfp", "oct", "derm")
MODALITY_IDS: dict[str, int] = {name: i for i, name in enumerate(MODALITIES)}
NUM_MODALITIES = len(MODALITIES)
EMPTY_MODALITY_ID = -1


def modality_id(name: str) -> int:
    """Id of a modality name, with an error that lists the valid names."""
    try:
        return MODALITY_IDS[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}") from None
