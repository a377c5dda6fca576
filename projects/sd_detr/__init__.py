"""SD-DETR / Decoupled DETR (Zhang et al., ICCV 2023) as a d2detr project: ``d2detr.projects.sd_detr``."""
