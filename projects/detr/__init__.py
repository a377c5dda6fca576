"""DETR (Carion et al., ECCV 2020) as a d2detr project: ``d2detr.projects.detr``."""
