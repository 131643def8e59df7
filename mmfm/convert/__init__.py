"""Model conversion: to and from Hugging Face transformers (Mixtral, Llama), and upcycling of
dense checkpoints into MoE models."""

from mmfm.convert.hf import export_hf, from_hf_config, import_hf, to_hf_config
from mmfm.convert.upcycle import upcycle_dense_to_moe

__all__ = ["export_hf", "from_hf_config", "import_hf", "to_hf_config", "upcycle_dense_to_moe"]
