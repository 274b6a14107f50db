"""qdrop.nlp: post-training quantization of Hugging Face transformers (eager module swap).

    qmodel = prepare_transformer(model, bits="w8a8")          # every nn.Linear -> QuantLinear, quantizers off
    smoothquant(qmodel, batches) | osplus(qmodel, batches) | gamma_migration(qmodel)   # optional, FP-exact
    rotate_inputs(qmodel, "mlp" | "all")                      # optional, FP-exact: Linear inputs rotated online
    calibrate_transformer(qmodel, batches)                    # padding never enters a range
    token_wise_clipping(qmodel, batches)                      # Outlier Suppression, optional
    tune_step_sizes(qmodel, batches, steps=64)                # optional, last: weight steps learned end to end

or all at once: quantize_transformer(...); block reconstruction through qdrop.reconstruct, and the
whole job (load, quantize, evaluate) in qdrop.nlp_pipeline.run_nlp_quantize. See docs/nlp.md.
"""
from .adapters import Adapter, LinearPair, NormGroup, find_adapter
from .clipping import coarse_clipping, fine_clipping, token_wise_clipping
from .equalize import channel_stats, gamma_migration, osplus, smoothquant
from .errors import DataError, ModelError, TokenizerMissingError, UnsupportedModelError
from .layers import QuantLinear, per_token_fake_quant
from .mask import current_mask, token_mask
from .pipeline import NLP_ALGOS, quantize_transformer
from .rotation import ROTATE_SITES, rotate_inputs, rotation_matrix, rotation_targets
from .tune import tune_step_sizes
from .units import ScopePartition, find_blocks
from .prepare import calibrate_transformer, prepare_transformer, quant_linears

__all__ = [
    "Adapter", "DataError", "LinearPair", "ModelError", "NLP_ALGOS", "NormGroup", "QuantLinear", "TokenizerMissingError",
    "UnsupportedModelError", "calibrate_transformer", "channel_stats", "coarse_clipping", "fine_clipping", "current_mask", "find_adapter",
    "gamma_migration", "osplus", "per_token_fake_quant", "prepare_transformer", "quant_linears", "quantize_transformer",
    "ROTATE_SITES", "rotate_inputs", "rotation_matrix", "rotation_targets",
    "ScopePartition", "find_blocks", "smoothquant", "token_mask", "token_wise_clipping", "tune_step_sizes",
]
