from .mobilenet import MobileNetV2Backbone, mobilenet_v2_weights_path
from .resnet import build_resnet, convert_torchvision_resnet_state_dict

__all__ = [
    "build_resnet",
    "convert_torchvision_resnet_state_dict",
    "MobileNetV2Backbone",
    "mobilenet_v2_weights_path",
]
