"""The static-cache decoder (decoding.py) gives greedy generate()'s tokens for every family and prompt mode."""
import pytest
import torch

from decoding import StaticKVCache, greedy_decode
from model_family import family_for, load_model, load_tokenizer
from prediction import left_pad

PROMPT_MODES = {"plain": {}, "prefix": {"pre_seq_len": 3}, "projection": {"pre_seq_len": 3, "prefix_projection": True},
                "embedding_only": {"pre_seq_len": 3, "prompt_embedding_only": True}}
TEXTS = ["大灯不亮", "发动机异响，水泵漏水，刹车片磨损严重", "刹车"]


def batch_for(folder):
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    prompts = [family.build_prompt_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    return left_pad(prompts, tokenizer.pad_token_id)


@pytest.mark.parametrize("mode", list(PROMPT_MODES))
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_static_decoding_equals_generate(family_model_dirs, untied_model_dir, family, mode):
    # ChatGLM-6B: the untied folder, since greedy decoding of a tied random model just repeats <sop>
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    torch.manual_seed(0)
    model = load_model(folder, **PROMPT_MODES[mode]).eval()
    input_ids, attention_mask = batch_for(folder)
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, input_ids.shape[1]:]
    got = greedy_decode(model, input_ids, attention_mask, 12, stop_ids=[], bucket=4)  # the visible cache grows by 4
    assert got.tolist() == expected.tolist()
    # prompts in groups by length, each cut to its own longest (the longest row alone, then the two shorter)
    grouped = greedy_decode(model, input_ids, attention_mask, 12, stop_ids=[], bucket=4, prefill_rows=1)
    assert grouped.tolist() == expected.tolist()
    assert greedy_decode(model, input_ids, attention_mask, 12, stop_ids=[], prefill_rows=2).tolist() == expected.tolist()
    assert len(set(got[1].tolist())) > 3  # informative: not one token repeated


def test_unmerged_lora_decodes_like_generate(untied_model_dir):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(load_model(untied_model_dir), LoraConfig(r=4, target_modules=["query_key_value"],
                                                                     init_lora_weights=False)).eval()
    input_ids, attention_mask = batch_for(untied_model_dir)
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, input_ids.shape[1]:]
    assert greedy_decode(model, input_ids, attention_mask, 8, stop_ids=[]).tolist() == expected.tolist()


def test_decoding_stops_early_once_every_row_has_a_stop_token(untied_model_dir):
    model = load_model(untied_model_dir).eval()
    input_ids, attention_mask = batch_for(untied_model_dir)
    free = greedy_decode(model, input_ids, attention_mask, 40, stop_ids=[])
    stop = free[:, 1].tolist()  # each row's second token: every row stops within the first check
    cut = greedy_decode(model, input_ids, attention_mask, 40, stop_ids=stop, check_every=4)
    assert cut.shape[1] == 4 and cut.tolist() == free[:, :4].tolist()


def test_cache_writes_the_prompt_then_one_slot_per_step():
    cache = StaticKVCache(capacity=6)
    key = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)
    keys, _ = cache.update(key, key, layer_idx=0)
    assert keys.shape == (2, 1, 3, 2) and torch.equal(keys, key)
    cache.cursor = torch.tensor([3])
    keys, _ = cache.update(torch.full((2, 1, 1, 2), 7.0), torch.zeros(2, 1, 1, 2), layer_idx=0)
    assert keys.shape == (2, 1, 6, 2) and keys[:, :, 3].eq(7).all() and keys[:, :, 4:].eq(0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a GPU")
@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_cuda_graph_replay_equals_generate_on_the_gpu(family_model_dirs, untied_model_dir, family):
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    model = load_model(folder, pre_seq_len=3).cuda().eval()
    input_ids, attention_mask = (t.cuda() for t in batch_for(folder))
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, input_ids.shape[1]:]
    got = greedy_decode(model, input_ids, attention_mask, 20, stop_ids=[], cuda_graph=True, bucket=8)  # 3+ graphs
    assert got.tolist() == expected.tolist()
