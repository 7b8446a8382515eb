"""Networks: the 3D ESPCN, reversible blocks and ESPCN-RN-N (plain or memory-efficient)."""

from monai_iqt.networks.espcn import ESPCN, VALID_SHRINK
from monai_iqt.networks.initialisation import INITS
from monai_iqt.networks.revnet import ESPCN_RN, ResidualBottleneck, RevBlock, receptive_halo

__all__ = [
    "ESPCN",
    "ESPCN_RN",
    "INITS",
    "VALID_SHRINK",
    "ResidualBottleneck",
    "RevBlock",
    "receptive_halo",
]
