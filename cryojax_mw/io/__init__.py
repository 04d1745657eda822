"""Files in and out: MRC maps (with their voxel size in Angstrom), IMOD tilt-angle files and particle
lists (RELION STAR and CSV).

Every writer is atomic (a temporary file renamed over the destination), and
`check_output_not_input` lets command-line tools refuse to overwrite their inputs.
"""

from ._angles import read_tilt_angles, write_tilt_angles
from ._mrc import atomic_write, check_output_not_input, read_mrc, write_mrc
from ._particles import ParticleList, read_particles, write_particles_csv, write_particles_star

__all__ = [
    "ParticleList",
    "atomic_write",
    "check_output_not_input",
    "read_mrc",
    "read_particles",
    "read_tilt_angles",
    "write_mrc",
    "write_particles_csv",
    "write_particles_star",
    "write_tilt_angles",
]
