"""Networks: the 3D ESPCN, reversible blocks and ESPCN-RN-N (plain or memory-efficient)."""

from monai_iqt.engine.dropout import ChannelDropout3d, fixed_dropout_masks
from monai_iqt.networks.espcn import ESPCN, LOG_VAR_BOUND, VALID_SHRINK, split_mean_log_var
from monai_iqt.networks.initialisation import INITS
from monai_iqt.networks.revnet import ESPCN_RN, ResidualBottleneck, RevBlock, receptive_halo

__all__ = [
    "ChannelDropout3d",
    "ESPCN",
    "ESPCN_RN",
    "INITS",
    "LOG_VAR_BOUND",
    "VALID_SHRINK",
    "ResidualBottleneck",
    "RevBlock",
    "fixed_dropout_masks",
    "receptive_halo",
    "split_mean_log_var",
]
