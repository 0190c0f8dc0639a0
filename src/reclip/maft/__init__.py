"""MAFT (Jiao et al. 2023, mask-aware fine-tuning of CLIP): the IP-CLIP encoder, mask
proposals and the proposal-classifying segmentor (METHODS.md s.5)."""

from reclip.maft.ipclip import default_start_layer, ip_clip_embeddings, proposal_attention_mask

__all__ = ["default_start_layer", "ip_clip_embeddings", "proposal_attention_mask"]
