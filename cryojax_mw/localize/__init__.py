"""From tomograms to particle lists: sliding-window segmentation with a patch classifier,
clustering of the label map into particles (mean-shift as DeepFinder, or connected components),
the template-matching baseline, and scoring against the ground truth (precision, recall, F1,
confusion matrix).
"""

from ._clustering import Detections, cluster_connected_components, cluster_mean_shift, mean_shift
from ._evaluate import MATCHINGS, Evaluation, evaluate_detections
from ._inference import Segmentation, label_voxels, segment_tomogram
from ._template_matching import TemplateMatch, match_template, pick_peaks, rotation_grid

__all__ = [
    "MATCHINGS",
    "Detections",
    "Evaluation",
    "Segmentation",
    "TemplateMatch",
    "cluster_connected_components",
    "cluster_mean_shift",
    "evaluate_detections",
    "label_voxels",
    "match_template",
    "mean_shift",
    "pick_peaks",
    "rotation_grid",
    "segment_tomogram",
]
