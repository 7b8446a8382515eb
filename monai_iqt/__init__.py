"""monai-iqt: deep Image Quality Transfer of diffusion tensor images with MONAI.

Networks (ESPCN, ESPCN-RN-N with a memory-efficient reversible engine), patch data,
training wiring for the MONAI bundle, sliding-window inference and evaluation.
"""

__version__ = "0.1.0"
