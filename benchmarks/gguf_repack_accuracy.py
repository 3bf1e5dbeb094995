"""The accuracy cost of re-packing K-quants into Q8_0 (`keras_llama.presets.gguf_blocks`):
SmolLM2-135M-Instruct quantized by llama.cpp (llama-cpp-python's ``llama_model_quantize``) to
Q4_K_M from a float32 copy of the built-in file's weights, then loaded by keras-llama as
re-packed Q8_0 blocks and as dequantized float32 (``dtype="float32"``). One JSON line:

    python benchmarks/gguf_repack_accuracy.py

``tensor_types``: what llama.cpp wrote (SmolLM2's 576-wide rows are not a multiple of 256, so
llama.cpp falls back to Q5_0 for those; Q4_K / Q6_K for the 1536-wide ``ffn_down``).
``cosine_min`` / ``cosine_mean``: last-token logits of chat prompts, re-packed vs float32;
``top1_vs_llama_cpp``: agreement of the top next token with llama.cpp's on the same file over
every position of the prompts, for both paths; ``weight_mb``: the backbone's weights.
"""

import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "How do I reverse a list in Python?",
]


def write_float32(source, target):
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = gguf.GGUFValueType(field.types[1]) if len(field.types) > 1 else None
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(key, value, gguf.GGUFValueType(field.types[0]), sub)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_q4_k_m(source, target):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize failed ({code})")


def main():
    import numpy as np
    from keras import ops

    from keras_llama.models import CausalLM
    from keras_llama.models.llama3.llama3_presets import backbone_presets
    from keras_llama.presets import handles
    from keras_llama.presets.gguf_file import GGUFFile

    source = handles.resolve(backbone_presets["smollm2_135m_instruct"]["kaggle_handle"])
    with tempfile.TemporaryDirectory() as folder:
        f32, path = os.path.join(folder, "f32.gguf"), os.path.join(folder, "q4_k_m.gguf")
        write_float32(source, f32)
        quantize_q4_k_m(f32, path)
        types = collections.Counter(t.tensor_type.name for t in GGUFFile(path).tensors.values())
        models = {"repacked": CausalLM.from_preset(path),
                  "float32": CausalLM.from_preset(path, dtype="float32")}  # fmt: skip
        preprocessor = models["float32"].preprocessor
        rows = [preprocessor.tokenizer(preprocessor.apply_chat_template(
            [{"role": "user", "content": q}])).tolist() for q in QUESTIONS]  # fmt: skip
        logits = {}
        for name, causal_lm in models.items():
            logits[name] = [
                ops.convert_to_numpy(causal_lm({"token_ids": np.array([r], "int32"),
                                                "padding_mask": np.ones((1, len(r)), bool)}))[0]
                for r in rows
            ]  # fmt: skip
        import llama_cpp
        from llama_cpp import Llama

        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False  # llama.cpp's repacked buffers crash on this CPU
            return p

        llama_cpp.llama.llama_cpp.llama_model_default_params = params
        llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
        reference = []
        for r in rows:
            llm.reset()
            llm.eval(r)
            reference.append(np.array(llm.scores[: len(r)]).argmax(-1))
        reference = np.concatenate(reference)
        last = {name: np.stack([x[-1] for x in v]).astype("float64") for name, v in logits.items()}
        a, b = last["repacked"], last["float32"]
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        top1 = {name: round(float((np.concatenate([x.argmax(-1) for x in v]) == reference).mean()),
                            4) for name, v in logits.items()}  # fmt: skip
        weight_mb = {name: round(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                                     for v in m.backbone.weights) / 2**20)
                     for name, m in models.items()}  # fmt: skip
        print(json.dumps({
            "benchmark": "gguf_repack_accuracy", "date": time.strftime("%Y-%m-%d"),
            "file": "SmolLM2-135M-Instruct Q4_K_M (llama.cpp, from float32)",
            "tensor_types": dict(types), "positions": int(len(reference)),
            "cosine_min": round(float(cosine.min()), 5), "cosine_mean": round(float(cosine.mean()), 5),
            "top1_vs_llama_cpp": top1, "weight_mb": weight_mb,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
