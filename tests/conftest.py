import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny ChatGLM-6B folder in the official layout (tied head, sharded .bin), tokenizer trained on data/."""
    from tools.make_tiny_model import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), num_layers=2, hidden_size=64,
                            num_attention_heads=4, inner_hidden_size=128)


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory):
    """Like tiny_model_dir with a separate lm_head, so that greedy decoding of random weights is informative."""
    from tools.make_tiny_model import build_tiny_model
    return build_tiny_model(str(tmp_path_factory.mktemp("untied")), num_layers=2, hidden_size=64,
                            num_attention_heads=4, inner_hidden_size=128, tie_word_embeddings=False,
                            weights_format="safetensors", shards=1, seed=1)
