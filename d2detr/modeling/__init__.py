# --- core (backbones, neck, matcher, criterion, meta-arch base) ---
from .backbone import MobileNetV2Backbone, build_resnet, convert_torchvision_resnet_state_dict
from .criterion import SetCriterion
from .losses import sigmoid_focal_loss
from .matcher import HungarianMatcher
from .meta_arch import DETRBase
from .neck import ChannelMapper
