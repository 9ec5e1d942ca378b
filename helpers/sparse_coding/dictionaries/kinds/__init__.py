"""The SAE kinds, one file each; importing this package registers them all (see dictionaries.base.register_sae)."""

from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .relu import ReLUBiasDecaySAE, ReLUSAE
from .topk import TopKSAE

__all__ = ["BatchTopKSAE", "JumpReLUSAE", "ReLUBiasDecaySAE", "ReLUSAE", "TopKSAE"]
