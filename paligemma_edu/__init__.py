__version__ = "0.1.0"

# The public API: `from paligemma_edu import ...` (every module can also be imported on its own).

from .core import pick_device, pick_dtype, seed_everything, compare_layers, evaluating, model_device
from .images import SiglipImageProcessor, load_image, to_pil
from .siglip import SiglipVisionConfig, SiglipVisionModel
from .kv_cache import KVCache
from .gemma import GemmaConfig, GemmaForCausalLM
from .paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from .processor import PaliGemmaProcessor, PaliGemmaTokenizer, build_paligemma_tokenizer
from .generate import generate, answer, TextStreamer, parse_detections, draw_boxes, loc_tokens
from .paligemma2 import paligemma2_config, paligemma2_3b_config
from .bundled import load_bundled_model
from .big_vision import from_big_vision
from .quantization import quantize
from .fast_decoding import StaticDecoder

# Later notebooks attach methods to earlier classes (`09_paligemma` says why); importing their modules here gives every
# `import paligemma_edu.X` the full classes: generate -> `.generate`, checkpoints -> `.from_pretrained`,
# `.save_pretrained`, fast_decoding -> `.static_decoder` (generate's compile=), quantization -> the loader of quantized
# folders (checkpoints.QUANTIZERS).
from . import generate as _generate, checkpoints as _checkpoints  # noqa: F401

__all__ = ["pick_device", "pick_dtype", "seed_everything", "compare_layers", "evaluating", "model_device",
           "SiglipImageProcessor", "load_image", "to_pil", "SiglipVisionConfig", "SiglipVisionModel", "KVCache",
           "GemmaConfig", "GemmaForCausalLM", "PaliGemmaConfig", "PaliGemmaForConditionalGeneration",
           "PaliGemmaProcessor", "PaliGemmaTokenizer", "build_paligemma_tokenizer", "generate", "answer", "TextStreamer",
           "parse_detections", "draw_boxes", "loc_tokens", "paligemma2_config", "paligemma2_3b_config",
           "load_bundled_model", "from_big_vision", "quantize", "StaticDecoder"]
