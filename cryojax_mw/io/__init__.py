"""Files in and out: MRC maps (with their voxel size in Angstrom) and IMOD tilt-angle files.

Every writer is atomic (a temporary file renamed over the destination), and
`check_output_not_input` lets command-line tools refuse to overwrite their inputs.
"""

from ._angles import read_tilt_angles, write_tilt_angles
from ._mrc import atomic_write, check_output_not_input, read_mrc, write_mrc

__all__ = [
    "atomic_write",
    "check_output_not_input",
    "read_mrc",
    "read_tilt_angles",
    "write_mrc",
    "write_tilt_angles",
]
