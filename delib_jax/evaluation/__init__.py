"""The evaluation protocol: ground-truth insecurities from parts and attributes, and their metrics; faithfulness of
attribution maps (deletion / insertion curves, infidelity)."""

from delib_jax.evaluation.faithfulness import curve_area, infidelity, perturbation_curves
from delib_jax.evaluation.ground_truth import (
    ade_ambiguity_strength,
    ade_object_frequency,
    cub_ambiguity_strength,
    select_ground_truth,
)
from delib_jax.evaluation.metrics import (
    COVERAGES,
    coverage_counts,
    mask_iou,
    pixel_ranks,
    point_precision_recall,
    random_maps,
)

__all__ = [
    "COVERAGES",
    "ade_ambiguity_strength",
    "ade_object_frequency",
    "coverage_counts",
    "cub_ambiguity_strength",
    "curve_area",
    "infidelity",
    "mask_iou",
    "perturbation_curves",
    "pixel_ranks",
    "point_precision_recall",
    "random_maps",
    "select_ground_truth",
]
