"""The static-cache decoder (decoding.py) gives greedy generate()'s tokens for every family and prompt mode."""
import pytest
import torch

from decoding import SlotDecoder, StaticKVCache, greedy_decode
from model_family import family_for, load_model, load_tokenizer
from decoding import left_pad

PROMPT_MODES = {"plain": {}, "prefix": {"pre_seq_len": 3}, "projection": {"pre_seq_len": 3, "prefix_projection": True},
                "embedding_only": {"pre_seq_len": 3, "prompt_embedding_only": True}}
TEXTS = ["大灯不亮", "发动机异响，水泵漏水，刹车片磨损严重", "刹车"]


def batch_for(folder):
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    prompts = [family.build_prompt_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    return left_pad(prompts, tokenizer.pad_token_id)


@pytest.mark.parametrize("mode", list(PROMPT_MODES))
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3", "glm4", "glm4-0414"])
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


def slot_decode(model, prompts, joins, new_tokens, slots):
    """serve.py's continuous batching: at each step the live rows decode one token, then prompt i enters a free slot
    at step joins[i] (its first token from its prompt's forward); a row with `new_tokens` tokens frees its slot."""
    vocab = getattr(model.config, "padded_vocab_size", None) or model.config.vocab_size
    decoder = SlotDecoder(model, slots, capacity=64, text_ids=range(vocab))
    owner, answers = [None] * slots, [[] for _ in prompts]

    def take(row):
        answers[owner[row]].append(decoder.tokens[row, 0].item())
        if len(answers[owner[row]]) == new_tokens:
            owner[row] = None
            decoder.release([row])
    for step in range(max(joins) + new_tokens):
        live = [r for r in range(slots) if owner[r] is not None]
        if live:
            decoder.run_step(64)
            for row in live:
                take(row)
        entering = [i for i, j in enumerate(joins) if j == step]
        rows = [r for r in range(slots) if owner[r] is None][:len(entering)]
        assert len(rows) == len(entering), "the test's schedule needs a free slot"
        if entering:
            decoder.admit(rows, [prompts[i] for i in entering])
            for row, i in zip(rows, entering):
                owner[row] = i
                take(row)
    return answers


@pytest.mark.parametrize("family, mode", [("chatglm", "plain"), ("chatglm", "prefix"), ("chatglm2", "embedding_only"),
                                          ("chatglm2", "prefix"), ("glm4", "plain")])
def test_slot_decoder_rows_that_enter_and_leave_mid_way_decode_as_generate(family_model_dirs, untied_model_dir,
                                                                             family, mode):
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    torch.manual_seed(0)
    model = load_model(folder, **PROMPT_MODES[mode]).eval()
    family_, tokenizer = family_for(folder), load_tokenizer(folder)
    texts = TEXTS + ["怠速抖动", "空调不制冷，风量小"]
    prompts = [family_.build_prompt_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    expected = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # three slots for five prompts: two enter together at step 0, one at step 2, and the last two wait for freed rows
    with torch.no_grad():
        got = slot_decode(model, prompts, joins=[0, 0, 2, 6, 7], new_tokens=6, slots=3)
    assert got == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "glm4-0414"])
def test_slot_decoder_replays_cuda_graphs_as_generate_on_the_gpu(family_model_dirs, untied_model_dir, family):
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    model = load_model(folder, pre_seq_len=3).cuda().eval()
    family_, tokenizer = family_for(folder), load_tokenizer(folder)
    prompts = [family_.build_prompt_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    expected = [model.generate(input_ids=torch.tensor([p]).cuda(), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    with torch.no_grad():
        assert slot_decode(model, prompts, joins=[0, 1, 6], new_tokens=6, slots=2) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a GPU")
def test_slot_decoder_in_bf16_with_flash_attention_gives_the_static_decoders_tokens(family_model_dirs):
    """serve.py's path on a GPU (bf16, flash attention's variable-length decode, CUDA graphs) against predict's:
    the same prompts entering together decode the same tokens."""
    folder = family_model_dirs["chatglm2"]
    model = load_model(folder).cuda().to(torch.bfloat16).eval()
    family_, tokenizer = family_for(folder), load_tokenizer(folder)
    prompts = [family_.build_prompt_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    input_ids, attention_mask = (t.cuda() for t in left_pad(prompts, tokenizer.pad_token_id))
    with torch.no_grad():
        expected = greedy_decode(model, input_ids, attention_mask, 10, stop_ids=[], prefill_rows=len(prompts))
        got = slot_decode(model, prompts, joins=[0] * len(prompts), new_tokens=10, slots=len(prompts))
    assert got == expected.tolist()


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


def test_cache_keeps_each_rows_tokens_without_padding_and_attends_over_them_only():
    # two rows, prompts of 3 and 1 tokens left-padded to 3, one leading slot (a prefix key): [lead | prompt | new]
    cache = StaticKVCache(capacity=1 + 3 + 2, prompt_lengths=torch.tensor([3, 1]), leading=1)
    key = torch.arange(1, 2 * 4 * 2 + 1, dtype=torch.float).view(2, 1, 4, 2)  # [rows, kv heads, lead + 3, dim]
    cache.set_prompt_rows(torch.tensor([0, 1]), width=3)
    returned, _ = cache.update(key, key, layer_idx=0)
    assert returned is key  # the prompt's forward attends to what it computed itself
    stored = cache.keys[0][:, :, 0]  # [rows, slots, dim]
    assert torch.equal(stored[0, :4], key[0, 0])  # lead + all three tokens
    assert torch.equal(stored[1, :2], key[1, 0, [0, 3]])  # lead + its one token; its two pads are not kept
    assert stored[1, 2:6].eq(0).all()
    cache.start_decoding()
    assert cache.next_slot.tolist() == [4, 2]
    # a decode step: each row's new key goes to its own next slot; a query equal to nothing in particular
    query, new = torch.zeros(2, 1, 1, 2), torch.full((2, 1, 1, 2), 100.0)
    out = cache.attend(query, new, new, layer_idx=0)
    assert cache.keys[0][0, 4, 0].eq(100).all() and cache.keys[0][1, 2, 0].eq(100).all()
    # a zero query weighs the seen values equally: row 1 sees its lead, its token and the new one, nothing else
    expected_row1 = (key[1, 0, 0] + key[1, 0, 3] + 100) / 3
    assert out.shape == (2, 1, 1, 2) and torch.allclose(out[1, 0, 0], expected_row1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a GPU")
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "glm4-0414"])
def test_cuda_graph_replay_equals_generate_on_the_gpu(family_model_dirs, untied_model_dir, family):
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    model = load_model(folder, pre_seq_len=3).cuda().eval()
    input_ids, attention_mask = (t.cuda() for t in batch_for(folder))
    expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, input_ids.shape[1]:]
    got = greedy_decode(model, input_ids, attention_mask, 20, stop_ids=[], cuda_graph=True, bucket=8)  # 3+ graphs
    assert got.tolist() == expected.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a GPU")
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_flash_decode_attention_equals_the_masked_one(kv_heads):
    import decoding
    torch.manual_seed(0)
    lengths = torch.tensor([5, 17, 1, 9], device="cuda")
    outputs = []
    for flash in (True, False):
        cache = StaticKVCache(capacity=2 + 17 + 4, prompt_lengths=lengths, leading=2)
        torch.manual_seed(1)  # the same keys, values and queries for both
        key = torch.randn(4, kv_heads, 2 + 17, 64, device="cuda", dtype=torch.bfloat16)
        value = torch.randn_like(key)
        cache.set_prompt_rows(torch.arange(4, device="cuda"), width=17)
        cache.update(key, value, layer_idx=0)
        cache.start_decoding()
        cache.flash = flash and decoding.flash_decoding_available(key, key.shape[-1])
        assert cache.flash == flash
        for _ in range(3):  # three steps, each row at its own slot
            query = torch.randn(4, 4, 1, 64, device="cuda", dtype=torch.bfloat16)
            new = torch.randn(4, kv_heads, 1, 64, device="cuda", dtype=torch.bfloat16)
            out = cache.attend(query, new, new, layer_idx=0)
            cache.next_slot += 1
        outputs.append(out.float())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a GPU")
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "glm4-0414"])
def test_flash_decoding_gives_the_masked_decodings_tokens_in_bf16(family_model_dirs, untied_model_dir, family,
                                                                    monkeypatch):
    import decoding
    folder = untied_model_dir if family == "chatglm" else family_model_dirs[family]
    model = load_model(folder, pre_seq_len=3).cuda().to(torch.bfloat16).eval()
    input_ids, attention_mask = (t.cuda() for t in batch_for(folder))
    flash = greedy_decode(model, input_ids, attention_mask, 20, stop_ids=[])
    monkeypatch.setattr(decoding, "flash_decoding_available", lambda tensor, head_dim: False)
    masked = greedy_decode(model, input_ids, attention_mask, 20, stop_ids=[], bucket=8)
    assert flash.tolist() == masked.tolist()
