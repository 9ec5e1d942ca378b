"""Stage 2, lm: train the offline default model, load any model as a TransformerLens bridge, name its hooks."""

from .fast_forward import CPUWorkers, NeoXFastPath
from .gguf import KNOWN as KNOWN_GGUF, gguf_folder, gguf_info, gguf_path, is_gguf
from .hooks import HookName, check_hooks, check_token_ids, default_layers, depth_layer, hook_layer, hook_name, hook_point, n_layers, parse_hook, valid_hooks
from .reading import HookReader, hook_reader
from .load import (DEFAULT_OFFLINE_DIR, Loaded, hub_revision, is_hub_name, load_hf_model, load_model, loaded, model_source,
                   offline_dir, resolve_revision)
from .text import default_ctx_len, document_fragments, held_out_contexts, held_out_tokens, model_contexts, validation_contexts
from .train import LMConfig, lr_at, model_id, revision_steps, train_offline_model, validation_loss

__all__ = ["KNOWN_GGUF", "gguf_folder", "gguf_info", "gguf_path", "is_gguf", "default_layers", "depth_layer", "default_ctx_len", "CPUWorkers", "NeoXFastPath", "HookReader", "hook_reader", "HookName", "check_hooks", "check_token_ids", "hook_layer", "hook_name", "hook_point",
           "n_layers", "parse_hook", "valid_hooks", "DEFAULT_OFFLINE_DIR", "Loaded", "hub_revision", "is_hub_name", "load_hf_model",
           "load_model", "loaded", "model_contexts", "model_source", "offline_dir", "resolve_revision",
           "validation_contexts", "document_fragments", "held_out_contexts", "held_out_tokens", "LMConfig", "lr_at", "model_id", "revision_steps", "train_offline_model", "validation_loss"]
