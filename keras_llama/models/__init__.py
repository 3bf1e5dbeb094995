"""Public model classes, under KerasHub's names."""

from keras_llama.models.backbone import Backbone
from keras_llama.models.causal_lm import CausalLM
from keras_llama.models.execution_plan import ExecutionPlan, StagePlan
from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.models.llama.llama_causal_lm import LlamaCausalLM
from keras_llama.models.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor
from keras_llama.models.llama.llama_tokenizer import LlamaTokenizer
from keras_llama.models.llama3.llama3_backbone import Llama3Backbone
from keras_llama.models.llama3.llama3_causal_lm import Llama3CausalLM
from keras_llama.models.llama3.llama3_causal_lm_preprocessor import Llama3CausalLMPreprocessor
from keras_llama.models.llama3.llama3_tokenizer import Llama3Tokenizer
from keras_llama.models.preprocessor import CausalLMPreprocessor, Preprocessor
from keras_llama.models.task import Task
from keras_llama.tokenizers.tokenizer import Tokenizer

__all__ = [
    "Backbone",
    "CausalLM",
    "CausalLMPreprocessor",
    "ExecutionPlan",
    "Llama3Backbone",
    "Llama3CausalLM",
    "Llama3CausalLMPreprocessor",
    "Llama3Tokenizer",
    "LlamaBackbone",
    "LlamaCausalLM",
    "LlamaCausalLMPreprocessor",
    "LlamaTokenizer",
    "Preprocessor",
    "StagePlan",
    "Task",
    "Tokenizer",
]
