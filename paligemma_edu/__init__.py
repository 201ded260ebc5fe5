__version__ = "0.1.0"

from .core import pick_device, pick_dtype, seed_everything, compare_layers
from .images import SiglipImageProcessor, load_image, to_pil
from .siglip import SiglipVisionConfig, SiglipVisionModel
from .kv_cache import KVCache
from .gemma import GemmaConfig, GemmaForCausalLM
from .paligemma import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from .processor import PaliGemmaProcessor, PaliGemmaTokenizer, build_paligemma_tokenizer
from .generate import generate, answer, TextStreamer, parse_detections, draw_boxes, loc_tokens
from . import checkpoints  # noqa: F401  (adds from_pretrained / save_pretrained to the model class)
from .paligemma2 import paligemma2_3b_config
