"""cryojax_mw: a JAX engine for cryo-electron tomography inverse problems that says how sure it is.

Conventions: volumes are (z, y, x) with z the beam at 0 deg and y the tilt axis; tilt series are
(n_tilts, y, x); angles are in degrees; voxel sizes in Angstrom.
"""

from .operators import (
    AbstractLinearOperator,
    ComposedOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
    TiltBackprojector,
    TiltGeometry,
    TiltProjector,
)

__version__ = "0.1.0"
