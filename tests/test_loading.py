"""Model folders in the official layout load; broken ones fail with one line naming the path."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_family import ModelFolderError, family_for, load_model, load_tokenizer


def copy_folder(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return str(dst)


def test_sharded_bin_and_safetensors_load_to_the_same_function(tiny_model_dir, untied_model_dir):
    assert os.path.isfile(os.path.join(tiny_model_dir, "pytorch_model.bin.index.json"))
    assert os.path.isfile(os.path.join(untied_model_dir, "model.safetensors"))
    for folder in (tiny_model_dir, untied_model_dir):
        model = load_model(folder)
        state = model.state_dict()
        assert "transformer.layers.0.attention.query_key_value.weight" in state and "lm_head.weight" in state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_on_request(tiny_model_dir, dtype):
    model = load_model(tiny_model_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=f"{tmp_path}/nowhere: model folder not found"):
        family_for(str(tmp_path / "nowhere"))


def test_missing_config(tmp_path):
    with pytest.raises(ModelFolderError, match="config.json: missing"):
        family_for(str(tmp_path))


def test_config_of_another_model_type(tiny_model_dir, tmp_path):
    folder = copy_folder(tiny_model_dir, tmp_path)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["model_type"] = "llama"
    json.dump(config, open(path, "w"))
    with pytest.raises(ModelFolderError, match="model_type 'llama' is not a model this suite serves"):
        family_for(folder)


def test_partial_download(tiny_model_dir, tmp_path):
    folder = copy_folder(tiny_model_dir, tmp_path)
    os.remove(os.path.join(folder, "pytorch_model-00002-of-00002.bin"))
    with pytest.raises(ModelFolderError, match="partial download, 1 of 2 weight shards missing: "
                                               "pytorch_model-00002-of-00002.bin"):
        load_model(folder)


def test_no_weights(tiny_model_dir, tmp_path):
    folder = copy_folder(tiny_model_dir, tmp_path)
    for name in os.listdir(folder):
        if name.startswith("pytorch_model"):
            os.remove(os.path.join(folder, name))
    with pytest.raises(ModelFolderError, match="no weights"):
        load_model(folder)


def test_weight_names_that_do_not_match_are_listed(untied_model_dir, tmp_path):
    folder = copy_folder(untied_model_dir, tmp_path)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["transformer.layers.0.attn.qkv.weight"] = state.pop("transformer.layers.0.attention.query_key_value.weight")
    save_file(state, path)
    with pytest.raises(ModelFolderError) as err:
        load_model(folder)
    message = str(err.value)
    assert "missing ['transformer.layers.0.attention.query_key_value.weight']" in message
    assert "unexpected ['transformer.layers.0.attn.qkv.weight']" in message


def test_tokenizer_file_that_is_not_sentencepiece(tiny_model_dir, tmp_path):
    folder = copy_folder(tiny_model_dir, tmp_path)
    with open(os.path.join(folder, "ice_text.model"), "w") as f:
        f.write("<html>rate limited</html>")
    with pytest.raises(ModelFolderError, match="ice_text.model: not a SentencePiece model"):
        load_tokenizer(folder)


def test_missing_tokenizer_file(tiny_model_dir, tmp_path):
    folder = copy_folder(tiny_model_dir, tmp_path)
    os.remove(os.path.join(folder, "ice_text.model"))
    with pytest.raises(ModelFolderError, match="ice_text.model: tokenizer model missing"):
        load_tokenizer(folder)


def test_the_family_is_read_from_the_folder(tiny_model_dir, tmp_path):
    from conftest import FIXTURES
    assert family_for(tiny_model_dir).name == "chatglm"
    glm2 = copy_folder(os.path.join(FIXTURES, "chatglm2", "base"), tmp_path)  # config.json only: ChatGLM2
    assert family_for(glm2).name == "chatglm2"
    # ChatGLM3 shares ChatGLM2's config; its tokenizer files (official: the chat template) name the role tokens
    with open(os.path.join(glm2, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "ChatGLMTokenizer", "chat_template": "[gMASK]sop{% for m in messages %}"
                   "<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}<|assistant|>"}, f)
    assert family_for(glm2).name == "chatglm3"
    assert family_for(glm2, mode="chatglm2").name == "chatglm2"
    with pytest.raises(ModelFolderError, match="--mode chatglm4: unknown model family; known: chatglm, chatglm2"):
        family_for(glm2, mode="chatglm4")


def test_a_foreign_model_folder_is_refused(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFolderError, match="model_type 'llama' is not a model this suite serves"):
        family_for(str(folder))


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_tiny_chatglm2_and_chatglm3_folders_load_with_their_tokenizers(family_model_dirs, family):
    folder = family_model_dirs[family]
    assert family_for(folder).name == family
    tokenizer = load_tokenizer(folder)
    assert tokenizer.role_tokens == (family == "chatglm3")
    model = load_model(folder)
    assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in model.state_dict()
    assert model.config.padded_vocab_size >= tokenizer.vocab_size


def test_an_embedding_only_prompt_on_chatglm2_loads(family_model_dirs):
    model = load_model(family_model_dirs["chatglm2"], pre_seq_len=4, prompt_embedding_only=True)
    assert model.transformer.prefix_encoder.embedding.weight.shape == (4, model.config.hidden_size)
