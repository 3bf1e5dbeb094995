"""Writers for other ecosystems: Hugging Face transformers folders (`transformers`) and
llama.cpp GGUF files (`gguf`). The model classes call them through their
``export_to_transformers`` / ``export_to_gguf`` methods (function-level imports: ``export``
imports ``models``, never the reverse at module level)."""
