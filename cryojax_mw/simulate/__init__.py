"""Simulated data with ground truth: test phantoms, macromolecule templates, crowded tomograms
(membranes, gold, decoys, particles at random orientations) and their tilt series.

Orientations follow RELION's ZYZ Euler convention (see `euler_zyz_to_matrix`).
"""

from ._acquisition import (
    NOISE_MODELS,
    TILT_ORDERS,
    TiltSeriesSimulation,
    acquisition_order,
    exposure_attenuation,
    simulate_tilt_series,
)
from ._dataset import (
    EXTRA_LABELS,
    SHREC_CLASSES,
    SimulatedTomogram,
    SimulationConfig,
    dataset_file_names,
    simulate_tomogram,
    write_dataset,
)
from ._phantoms import random_blobs, shepp_logan
from ._placement import bilayer_profile, ellipsoid, flat_membrane, gold_bead, vesicle
from ._rotations import (
    euler_zyz_to_matrix,
    matrix_to_euler_zyz,
    random_euler_zyz,
    rotate_volume,
    rotate_with_matrix,
)
from ._templates import Template, available_templates, default_template_folder, load_template

__all__ = [
    "EXTRA_LABELS",
    "NOISE_MODELS",
    "SHREC_CLASSES",
    "TILT_ORDERS",
    "SimulatedTomogram",
    "SimulationConfig",
    "Template",
    "TiltSeriesSimulation",
    "acquisition_order",
    "available_templates",
    "bilayer_profile",
    "dataset_file_names",
    "default_template_folder",
    "ellipsoid",
    "euler_zyz_to_matrix",
    "exposure_attenuation",
    "flat_membrane",
    "gold_bead",
    "load_template",
    "matrix_to_euler_zyz",
    "random_blobs",
    "random_euler_zyz",
    "rotate_volume",
    "rotate_with_matrix",
    "shepp_logan",
    "simulate_tilt_series",
    "simulate_tomogram",
    "vesicle",
    "write_dataset",
]
