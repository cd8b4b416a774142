"""deepdark: dark frames for guide-camera archives taken without darks (Deep-Dark-Net, 2024)."""

__version__ = "0.1.0"
