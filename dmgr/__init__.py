"""dmgr: synthesise labelled industrial defect images with Dual-Manifold Gradient Rectification."""

__version__ = "0.1.0"
