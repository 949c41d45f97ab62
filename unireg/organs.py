"""Organ vocabulary: TotalSegmentator (v2, 117 classes) names and label ids.

One vocabulary for the whole product: phantom label maps, prepared real data, shards,
prompts and the model's prompt cache all speak these names, so a label id read from a
shard means the same structure everywhere. Group names ("lungs", "kidneys", ...) expand
to several classes so users can write prompts the way they speak.
"""
from __future__ import annotations

_VERTEBRAE = ["vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2",
              "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
              "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4",
              "vertebrae_T3", "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6",
              "vertebrae_C5", "vertebrae_C4", "vertebrae_C3", "vertebrae_C2", "vertebrae_C1"]

#: TotalSegmentator v2 class names in label-id order (id = index + 1; 0 is background).
ORGANS: list[str] = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
    "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
    "kidney_cyst_left", "kidney_cyst_right", "sacrum", *_VERTEBRAE, "heart", "aorta",
    "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right",
    "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left",
    "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left",
    "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right",
    "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull",
    *[f"rib_left_{i}" for i in range(1, 13)], *[f"rib_right_{i}" for i in range(1, 13)],
    "sternum", "costal_cartilages",
]
assert len(ORGANS) == 117 and len(set(ORGANS)) == 117

ORGAN_TO_ID: dict[str, int] = {name: i + 1 for i, name in enumerate(ORGANS)}
ID_TO_ORGAN: dict[int, str] = {i: name for name, i in ORGAN_TO_ID.items()}

#: Names that stand for several classes.
GROUPS: dict[str, list[str]] = {
    "lungs": [n for n in ORGANS if n.startswith("lung_")],
    "lung_left": ["lung_upper_lobe_left", "lung_lower_lobe_left"],
    "lung_right": ["lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"],
    "kidneys": ["kidney_left", "kidney_right"],
    "adrenal_glands": ["adrenal_gland_left", "adrenal_gland_right"],
    "vertebrae": list(_VERTEBRAE),
    "lumbar_spine": [v for v in _VERTEBRAE if "_L" in v],
    "thoracic_spine": [v for v in _VERTEBRAE if "_T" in v],
    "ribs": [n for n in ORGANS if n.startswith("rib_")],
    "autochthon": ["autochthon_left", "autochthon_right"],
    "iliopsoas": ["iliopsoas_left", "iliopsoas_right"],
}

#: Common ways of saying a class name (after lower-casing and turning spaces/hyphens to "_").
SYNONYMS: dict[str, str] = {
    "bladder": "urinary_bladder", "gall_bladder": "gallbladder", "ivc": "inferior_vena_cava",
    "vena_cava": "inferior_vena_cava", "svc": "superior_vena_cava", "portal_vein": "portal_vein_and_splenic_vein",
    "splenic_vein": "portal_vein_and_splenic_vein", "hepatic": "liver", "renal": "kidneys",
    "kidney": "kidneys", "lung": "lungs", "spine": "vertebrae", "thyroid": "thyroid_gland",
    "bowel": "small_bowel", "large_bowel": "colon", "oesophagus": "esophagus", "cord": "spinal_cord",
    "pelvis": "hip_left", "myocardium": "heart", "spleens": "spleen", "livers": "liver",
}


def _canonical_token(text: str) -> str:
    return "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())


def _side_swapped(token: str) -> str | None:
    """'left_kidney' -> 'kidney_left' (TotalSegmentator puts the side last)."""
    for side in ("left", "right"):
        if token.startswith(side + "_"):
            return token[len(side) + 1:] + "_" + side
    return None


_CLASS_BY_LOWER = {name.lower(): name for name in ORGANS}  # "vertebrae_l3" -> "vertebrae_L3"


def resolve_organ(text: str) -> list[str] | None:
    """Map one user-written organ name to TotalSegmentator classes, or None if unknown."""
    token = _canonical_token(text)
    for candidate in (token, _side_swapped(token)):
        if candidate is None:
            continue
        candidate = SYNONYMS.get(candidate, candidate)
        if candidate in _CLASS_BY_LOWER:
            return [_CLASS_BY_LOWER[candidate]]
        if candidate in GROUPS:
            return list(GROUPS[candidate])
    return None


def organ_phrase(name: str) -> str:
    """Readable phrase for the text encoder: 'kidney_left' -> 'left kidney'."""
    words = name.split("_")
    if words[-1] in ("left", "right"):
        words = [words[-1]] + words[:-1]
    return " ".join(words)


def known_names() -> list[str]:
    """Every name the parser accepts (classes, groups, synonyms), for suggestions."""
    return sorted(set(ORGANS) | set(GROUPS) | set(SYNONYMS))
