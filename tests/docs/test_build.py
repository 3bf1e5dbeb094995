"""The site builds with ``mkdocs build --strict``: no broken link, no missing reference, no
docstring griffe cannot parse (a parameter documented that the signature lacks fails)."""

import os


def test_mkdocs_build_strict_passes(built_site):
    returncode, output, site = built_site
    assert returncode == 0, output[-5000:]
    for page in ("index.html", "api/models/index.html", "cli/index.html",
                 "loading/huggingface/index.html", "search/search_index.json"):  # fmt: skip
        assert os.path.isfile(os.path.join(site, page)), page


def test_generated_content_is_in_the_site(built_site):
    """The hooks' tables come from the code: names from the converter tables and options of
    the parser appear in the built pages."""
    _, _, site = built_site
    from keras_llama.cli import build_parser
    from keras_llama.presets import gguf_format, meta_format

    def read(page):
        with open(os.path.join(site, page, "index.html"), encoding="utf-8") as f:
            return f.read()

    gguf_page = read("loading/gguf")
    for name in list(gguf_format.GLOBAL_NAMES) + list(gguf_format.LAYER_NAMES):
        assert name in gguf_page, name
    meta_page = read("loading/meta")
    for name in list(meta_format.GLOBAL_NAMES) + list(meta_format.LAYER_NAMES):
        assert name in meta_page, name
    assert "model.layers.{i}.self_attn.q_proj.weight" in read("loading/huggingface")
    assert "layers/llama_transformer_decoder/_self_attention_layer/_query_dense/vars/0" in read(
        "loading/kerashub"
    )
    cli_page = read("cli")
    assert "--max-batch-size" in cli_page and "--lora-rank" in cli_page
    assert build_parser().prog in cli_page
