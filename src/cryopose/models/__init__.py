"""Pose-estimation networks. :mod:`.image2sphere` is the paper's baseline."""

from .image2sphere import Image2Sphere, Image2SphereConfig

__all__ = ["Image2Sphere", "Image2SphereConfig"]
