"""Backbones: the protocol every family implements and the registry of named sizes (``"SiT-XL/2"``)."""
from igdit.models.base import BACKBONES, Backbone, build_backbone, exit_head_name
from igdit.models.lightningdit import LightningDiT
from igdit.models.loading import load_backbone, model_config, read_checkpoint
from igdit.models.output import DiTOutput
from igdit.models.sit import SiT

__all__ = ["BACKBONES", "Backbone", "DiTOutput", "LightningDiT", "SiT", "build_backbone", "exit_head_name",
           "load_backbone", "model_config", "read_checkpoint"]
