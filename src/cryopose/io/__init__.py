"""File input and output, one module per concept.

- :mod:`cryopose.io.atomic`: writing files and folders atomically, and removing the temporaries
  of killed writers;
- :mod:`cryopose.io.star`: RELION particle STAR files and the particle images they name;
- :mod:`cryopose.io.mrc`: MRC image stacks and 3D maps.

Their public names are re-exported here, so callers write ``io.read_particles_star`` or
``io.atomic_write`` without knowing which module holds them. A benchmark entry (a folder of these
files) is :class:`cryopose.entry.Entry`.
"""

from __future__ import annotations

from . import atomic, mrc, star
from .atomic import *  # noqa: F403 - each module's __all__ is its public API, re-exported whole
from .mrc import *  # noqa: F403
from .star import *  # noqa: F403

# One list to keep: the three modules' own __all__, in their order.
__all__ = [*atomic.__all__, *star.__all__, *mrc.__all__]
