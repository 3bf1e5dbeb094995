"""An OpenAI-compatible server for keras-llama models (``keras-llama serve``): a FastAPI app
(`create_app`) driving the slot engine (continuous batching, `SlotEngine`)."""

from keras_llama.serving.app import create_app
from keras_llama.serving.slots import SlotEngine

__all__ = ["create_app", "SlotEngine"]
