"""The one place that knows timm's insides: embedding, token gather, block taps, q·kᵀ relations."""
