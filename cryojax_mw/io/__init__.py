"""Files in and out: MRC maps (with their voxel size in Angstrom), IMOD tilt-angle files and particle
lists (RELION STAR and CSV; DeepFinder XML object lists are read).

Every writer is atomic (a temporary file renamed over the destination), and
`check_output_not_input` lets command-line tools refuse to overwrite their inputs.
"""

from ._angles import read_tilt_angles, write_tilt_angles
from ._mrc import atomic_write, check_output_not_input, read_mrc, write_mrc
from ._particles import ParticleList, read_particles, write_particles_csv, write_particles_star
from ._xml import read_objlist_xml, read_particles_xml

__all__ = [
    "ParticleList",
    "atomic_write",
    "check_output_not_input",
    "read_mrc",
    "read_objlist_xml",
    "read_particles",
    "read_particles_xml",
    "read_tilt_angles",
    "write_mrc",
    "write_particles_csv",
    "write_particles_star",
    "write_tilt_angles",
]
