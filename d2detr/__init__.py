"""d2detr: the DETR family of end-to-end detectors as Detectron2 models."""

__version__ = "0.1.0"
