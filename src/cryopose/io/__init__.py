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

from .atomic import WriteError, atomic_write, atomic_writes, is_temporary, staged_folder, temporary_folder
from .mrc import StackWriter, open_stack, read_images, read_map, stack_shape, write_map
from .star import (
    FINITE_COLUMNS,
    INT_COLUMNS,
    OPTICS_COLUMNS,
    ParticleStar,
    check_unique_particles,
    parse_image_name,
    particle_keys,
    particles_with_optics,
    read_particles_star,
    resolve_stack_path,
    write_particles_star,
)

__all__ = [
    # atomic
    "WriteError",
    "atomic_write",
    "atomic_writes",
    "staged_folder",
    "temporary_folder",
    "is_temporary",
    # star
    "ParticleStar",
    "read_particles_star",
    "write_particles_star",
    "particles_with_optics",
    "parse_image_name",
    "resolve_stack_path",
    "particle_keys",
    "check_unique_particles",
    "OPTICS_COLUMNS",
    "FINITE_COLUMNS",
    "INT_COLUMNS",
    # mrc
    "open_stack",
    "stack_shape",
    "read_images",
    "StackWriter",
    "read_map",
    "write_map",
]
