"""cryopose: supervised particle pose estimation benchmark for cryo-EM."""

__version__ = "0.1.0"
