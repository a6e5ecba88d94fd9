"""The MedMNIST v2 2D flags: label names (from the MedMNIST INFO table), task type and modality.

Shared by the npz converter and the TFDS builders so both emit the same labels.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    modality: str  # the nearest of the seven MerMED modalities
    label_names: tuple[str, ...]
    channels: int = 1
    multi_label: bool = False


_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen")

FLAGS: dict[str, Flag] = {
    f.name: f
    for f in (
        Flag("pathmnist", "path", ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                   "normal colon mucosa", "cancer-associated stroma",
                                   "colorectal adenocarcinoma epithelium"), channels=3),
        Flag("chestmnist", "cxr", ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema",
                                   "fibrosis", "pleural", "hernia"), multi_label=True),
        Flag("dermamnist", "derm", ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                    "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                    "melanocytic nevi", "vascular lesions"), channels=3),
        Flag("octmnist", "oct", ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")),
        Flag("pneumoniamnist", "cxr", ("normal", "pneumonia")),
        Flag("retinamnist", "cfp", ("0", "1", "2", "3", "4"), channels=3),
        Flag("breastmnist", "us", ("malignant", "normal, benign")),
        Flag("bloodmnist", "path", ("basophil", "eosinophil", "erythroblast",
                                    "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)",
                                    "lymphocyte", "monocyte", "neutrophil", "platelet"), channels=3),
        Flag("tissuemnist", "path", ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                     "Glomerular endothelial cells", "Interstitial endothelial cells",
                                     "Leukocytes", "Podocytes", "Proximal Tubule Segments",
                                     "Thick Ascending Limb")),
        Flag("organamnist", "ct", _ORGANS),
        Flag("organcmnist", "ct", _ORGANS),
        Flag("organsmnist", "ct", _ORGANS),
    )
}
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


def flag_of(path: str | pathlib.Path) -> Flag:
    """The flag of an npz file named like the official ones (pathmnist.npz, pathmnist_64.npz, ...)."""
    match = re.match(r"([a-z]+mnist)", pathlib.Path(path).name)
    if match is None or match.group(1) not in FLAGS:
        raise ValueError(f"{path}: cannot tell the MedMNIST flag from the name; expected one of {sorted(FLAGS)}")
    return FLAGS[match.group(1)]


def labels_to_indices(row, multi_label: bool) -> tuple[int, ...]:
    """An npz label row -> label indices: the class for single-label, the positives for multi-label."""
    if multi_label:
        return tuple(int(i) for i in (row == 1).nonzero()[0])
    return (int(row[0]),)
