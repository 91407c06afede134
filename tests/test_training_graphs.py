"""The fixed-size loss (label positions chosen on the CPU) and the CUDA-graph training step (training_graphs.py)."""
import pytest
import torch

from data_set import PackRows, PadToLongest, labelled_positions
from model_family import family_for, load_model, load_tokenizer
from training_engine import enable_checkpointing


def rows_for(folder, texts_and_answers):
    family, tokenizer = family_for(folder), load_tokenizer(folder)
    rows = []
    for text, answer in texts_and_answers:
        source = tokenizer.encode(text, add_special_tokens=False)
        target = tokenizer.encode(answer, add_special_tokens=False)
        rows.append(dict(zip(("input_ids", "labels"), family.build_training_ids(tokenizer, source, target))))
    return rows, tokenizer


SHORT = [("大灯不亮", "大灯_部件故障_不亮"), ("刹车片磨损严重，发动机异响", "刹车片_部件故障_磨损严重")]
LONG = [("发动机异响，水泵漏水，刹车片磨损严重，空调不制冷", "水泵_部件故障_漏水\n空调_性能故障_不制冷"), ("刹车", "刹车_部件故障_失灵")]


def test_labelled_positions_are_the_labelled_next_tokens_padded_with_minus_one():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    assert labelled_positions(labels).tolist() == [1, 2, 3]  # flat in [2, 3]: row 0 cols 1,2; row 1 col 0
    assert labelled_positions(labels, 4).tolist() == [1, 2, 3, -1]


def test_the_training_collator_pads_label_positions_to_four_times_the_length_multiple(family_model_dirs):
    """Fewer (length, label count) shapes, so fewer CUDA graph captures (training.LABEL_MULTIPLE_FACTOR)."""
    from data_set import round_up
    from model_family import family_for
    from training import train_loader_collate
    folder = family_model_dirs["chatglm"]
    rows, tokenizer = rows_for(folder, LONG)
    pack = (family_for(folder).packed_row_inputs, load_model(folder, dtype=torch.float32).config)
    for collate in (train_loader_collate(tokenizer, 16, True), train_loader_collate(tokenizer, 16, True, pack)):
        batch = collate(rows)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        assert batch["input_ids"].shape[-1] % 16 == 0 and batch["label_positions"].shape[0] == round_up(labelled, 64)
        assert round_up(labelled, 64) != round_up(labelled, 16)  # these rows tell the two apart
        assert batch["label_positions"][:labelled].min() >= 0 and (batch["label_positions"][labelled:] == -1).all()


@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_loss_from_label_positions_equals_the_boolean_selection(family_model_dirs, family):
    folder = family_model_dirs[family]
    rows, tokenizer = rows_for(folder, SHORT)
    batch = PadToLongest(tokenizer.pad_token_id, 8, with_label_positions=True)(rows)
    batch["label_positions"] = labelled_positions(batch["labels"], 37)
    assert (batch["label_positions"] == -1).any()  # the padding is exercised
    model = load_model(folder, dtype=torch.float32).train()
    losses, grads = [], []
    for inputs in ({k: batch[k] for k in ("input_ids", "labels")}, batch):
        model.zero_grad()
        loss = model(**inputs, loss_only=True).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def graphed_and_eager_steps(folder, method, checkpointing=False):
    """Loss and trained gradients of three batches of two shapes (A, B, A), by graph replay and eagerly."""
    from training_graphs import TrainingGraphs
    torch.manual_seed(0)
    prompt = {"pre_seq_len": 3, "prefix_dropout": 0.0} if method == "prefix" else {}  # no randomness: equal losses
    model = load_model(folder, dtype=torch.float32, **prompt).cuda()
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=family_for(folder).lora_target.split(","),
                                                 lora_dropout=0.0, init_lora_weights=False))
    else:
        for name, p in model.named_parameters():
            p.requires_grad = "prefix_encoder" in name
    enable_checkpointing(model, checkpointing)
    model.train()
    short, tokenizer = rows_for(folder, SHORT)
    long, _ = rows_for(folder, LONG)
    pad = PadToLongest(tokenizer.pad_token_id, 8, with_label_positions=True)
    if checkpointing == "mlp+attention":  # its attention part recomputes the packed rows' kernels
        pad = PackRows(tokenizer.pad_token_id, family_for(folder).packed_row_inputs, model.config, 8,
                       with_label_positions=True)
    batches = [pad(short), pad(long), pad(short[::-1])]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape
    trained = [p for p in model.parameters() if p.requires_grad]
    # DeepSpeed keeps each parameter's gradient accumulator alive from its set-up on the default stream; so do we
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in trained]
    graphs, results = TrainingGraphs(model, torch.device("cuda")), {"graphed": [], "eager": []}
    for batch in batches:
        for way in ("graphed", "eager"):
            for p in trained:
                p.grad = None
            if way == "graphed":
                loss = graphs(batch)
            else:
                loss = model(**{k: v.cuda() for k, v in batch.items()}, loss_only=True).loss
            loss.backward()
            results[way].append((loss.item(), [p.grad.clone() for p in trained]))
    assert accumulators
    return results, len(graphs.shapes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("checkpointing", [False, True, "mlp", "mlp+attention"])
@pytest.mark.parametrize("method", ["lora", "prefix"])
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "glm4-0414"])
def test_graph_replay_gives_the_eager_loss_and_gradients(family_model_dirs, family, method, checkpointing):
    """With --gradient_checkpointing (blocks, mlp, mlp+attention over packed rows) too: the recomputation is
    captured into the backward graph."""
    results, captured = graphed_and_eager_steps(family_model_dirs[family], method, checkpointing)
    assert captured == 2  # the third batch has the first one's shape: replayed, not captured again
    for (loss, grads), (eager_loss, eager_grads) in zip(results["graphed"], results["eager"]):
        assert loss == pytest.approx(eager_loss, rel=1e-5)
        for got, expected in zip(grads, eager_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert results["graphed"][0][0] != pytest.approx(results["graphed"][1][0])  # the batches differ


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["lora", "pt2", "freeze"])
def test_training_script_with_cuda_graphs_logs_the_eager_losses(tiny_model_dir, few_rows, tmp_path, mode):
    from conftest import MODES, launch_all, logged_losses, memorise_args
    script, options = MODES[mode]
    runs, outs = [], {}
    for graphs in ("--cuda_graphs", "--no-cuda_graphs"):
        outs[graphs] = str(tmp_path / graphs)
        args = memorise_args(tiny_model_dir, few_rows, outs[graphs]) + options
        args[args.index("--num_train_epochs") + 1] = 3
        args[args.index("--train_batch_size") + 1] = 3  # two batches per epoch, of different shapes in some epochs
        args[args.index("--log_steps") + 1] = 1
        if mode == "pt2":
            args += ["--prefix_dropout", 0]  # no randomness: equal losses
        runs.append((script, *args, graphs, "--no-compile", "--pad_to_multiple_of", 16))
    launch_all(runs, accelerator="cuda")
    losses = {graphs: logged_losses(out) for graphs, out in outs.items()}
    assert len(losses["--cuda_graphs"]) == 6 and losses["--cuda_graphs"][0] > losses["--cuda_graphs"][-1]
    assert losses["--cuda_graphs"] == pytest.approx(losses["--no-cuda_graphs"], rel=1e-4)
