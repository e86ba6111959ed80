"""Fast stages: eval stages compiled as frozen inference graphs that never serve stale weights, TRAIN stages
compiled forward and backward, and no recompiles across batch sizes after warm-up."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import multitask_bricks
from torch import nn

from torchbricks_fx import BrickBackendError, BrickCollection, BrickTrainable, Stage, compile_stage, compiling
from torchbricks_fx.compiling import CompileOptions
from torchbricks_fx.numerics import compare_tensors, difference, tolerance


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def collection() -> BrickCollection:
    torch.manual_seed(0)
    return BrickCollection(multitask_bricks())


def train_inputs(batch_size: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(batch_size)
    return {"raw": torch.rand(batch_size, 3, 16, 16), "labels": torch.randint(0, 3, (batch_size,)),
            "masks": torch.randint(0, 2, (batch_size, 16, 16))}


FROZEN = CompileOptions(freeze=True)


def images(batch_size: int) -> dict[str, torch.Tensor]:
    return {"raw": torch.rand(batch_size, 3, 16, 16)}


def assert_like_eager(stage_module, collection, inputs, dtype=torch.float32) -> None:
    got = stage_module(inputs)
    want = collection(inputs, stage_module.stage)
    for name in stage_module.output_names:
        if dtype is torch.float32:
            ok, error, _ = compare_tensors(got[name], want[name])
        else:
            diff = difference(got[name], want[name], *tolerance(dtype))
            ok, error = diff.ok, diff.max_abs
        assert ok, f"{name}: max abs error {error}"


def train_step(collection: BrickCollection, inputs: dict[str, torch.Tensor]) -> None:
    optimizer = torch.optim.SGD(collection.parameters(), lr=0.5)
    out = collection(inputs, Stage.TRAIN)
    sum(collection.extract_losses(out).values()).backward()  # type: ignore[union-attr]
    optimizer.step()
    optimizer.zero_grad()


# ------------------------------------------------------------------------------------------- staleness
@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "load_bricks", "to", "swapped_layer"])
def test_a_frozen_eval_stage_never_serves_stale_weights(collection, tmp_path, change):
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    assert_like_eager(inference, collection, images(2))
    first_compiles = inference.compiled.compiles
    if change == "optimizer_step":
        train_step(collection, train_inputs())
    elif change == "load_state_dict":
        other = BrickCollection(multitask_bricks())
        collection.load_state_dict(other.state_dict())
    elif change == "load_bricks":
        other = BrickCollection(multitask_bricks())
        collection.load_bricks(other.save_bricks(tmp_path / "weights"))
    elif change == "to":
        collection.to(memory_format=torch.channels_last)  # new storages, same values
        with torch.no_grad():
            collection["backbone"].model.conv.weight.mul_(2.0)
    else:  # a layer swapped in after the first call, then changed in place: both are seen
        collection["heads"]["classifier"].model.fc = nn.Linear(8, 3)
        assert_like_eager(inference, collection, images(2))
        with torch.no_grad():
            collection["heads"]["classifier"].model.fc.weight.mul_(2.0)
    assert_like_eager(inference, collection, images(2))  # the new weights, refrozen
    assert inference.compiled.compiles > first_compiles


def test_a_train_stage_between_eval_calls_refreezes_once(collection):
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    train = compile_stage(collection, Stage.TRAIN, compile=True)
    assert_like_eager(inference, collection, images(3))
    compiles = inference.compiled.compiles
    assert_like_eager(inference, collection, images(3))
    assert inference.compiled.compiles == compiles  # unchanged weights: nothing recompiles
    optimizer = torch.optim.SGD(collection.parameters(), lr=0.5)
    out = train(train_inputs())
    (out["loss_cls"] + out["loss_seg"]).backward()
    optimizer.step()
    assert_like_eager(inference, collection, images(3))
    assert inference.compiled.compiles == compiles + 1


def test_a_fused_optimizer_step_after_the_last_train_call_is_seen(collection):
    """A fused optimizer moves no version counter; the stage counts optimizer steps instead (here the eval
    call comes between backward and the step, so no training call follows the change)."""
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    optimizer = torch.optim.AdamW(collection.parameters(), lr=0.1, fused=True)
    out = collection(train_inputs(), Stage.TRAIN)
    sum(collection.extract_losses(out).values()).backward()  # type: ignore[union-attr]
    assert_like_eager(inference, collection, images(2))
    weight = collection["backbone"].model.conv.weight
    version = weight._version
    optimizer.step()
    assert weight._version == version  # what makes this case hard
    assert_like_eager(inference, collection, images(2))


@pytest.mark.parametrize("case", ["parameters replaced", "gradients cleared by the optimizer's own hook"])
def test_fused_optimizer_steps_are_seen_in_harder_cases(collection, case):
    """Parameters replaced by load_state_dict(assign=True) are watched from then on; a post-step hook of the
    optimizer that frees the gradients (it runs before torch's global hooks) hides nothing."""
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    assert_like_eager(inference, collection, images(2))
    if case == "parameters replaced":
        collection.load_state_dict(BrickCollection(multitask_bricks()).state_dict(), assign=True)
        assert_like_eager(inference, collection, images(2))
    optimizer = torch.optim.AdamW(collection.parameters(), lr=0.1, fused=True)
    if case != "parameters replaced":
        optimizer.register_step_post_hook(lambda o, args, kwargs: o.zero_grad(set_to_none=True))
    out = collection(train_inputs(), Stage.TRAIN)
    sum(collection.extract_losses(out).values()).backward()  # type: ignore[union-attr]
    assert_like_eager(inference, collection, images(2))
    optimizer.step()
    assert_like_eager(inference, collection, images(2))


def test_an_optimizer_step_that_changes_none_of_its_weights_recompiles_nothing(collection):
    """torch's optimizers skip parameters without a gradient (frozen bricks in AdamW(model.parameters()))."""
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    assert_like_eager(inference, collection, images(2))
    compiles = inference.compiled.compiles
    torch.optim.SGD(collection.parameters(), lr=0.5).step()  # no backward: no gradients
    assert_like_eager(inference, collection, images(2))
    assert inference.compiled.compiles == compiles


def test_training_another_collection_does_not_refreeze_a_frozen_stage(collection):
    """A fixed teacher's frozen stage beside a student in training: the student's steps are not the
    teacher's changes."""
    teacher = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    assert_like_eager(teacher, collection, images(2))
    compiles = teacher.compiled.compiles
    student = BrickCollection(multitask_bricks())
    for _ in range(2):
        train_step(student, train_inputs())
        compile_stage(student, Stage.TRAIN)(train_inputs())
        assert_like_eager(teacher, collection, images(2))
    assert teacher.compiled.compiles == compiles


# ------------------------------------------------------------------------------------------- recompiles
def test_no_recompiles_across_batch_sizes_after_warm_up(collection):
    inference = compile_stage(collection, Stage.INFERENCE,
                              compile=CompileOptions(freeze=True, fail_on_recompile=True))
    inference.warm_up(images(4), batch_sizes=[1, 2, 16])
    compiles = inference.compiled.compiles
    assert inference.compiled.batch_sizes == (1, 2, 16)  # each a graph of its own ...
    assert 4 <= compiles <= 6  # ... and the dynamic-batch graph for their ranges (1, 2-15, 16+ on CPU)
    for batch_size in (8, 1, 32, 3, 2, 5):
        assert_like_eager(inference, collection, images(batch_size))
    assert inference.compiled.compiles == compiles
    with pytest.raises(BrickBackendError, match=r"would recompile after warm-up.*dtype mismatch"):
        inference({"raw": torch.rand(2, 3, 16, 16, dtype=torch.float64)})


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "not-frozen"])
def test_the_first_batch_size_is_specialized_and_the_others_share_one_graph(collection, freeze):
    inference = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=freeze))
    for batch_size in (2, 3, 5, 9, 2):
        assert_like_eager(inference, collection, images(batch_size))
    compiled = inference.compiled
    assert compiled.batch_sizes == (2,)
    assert compiled.choice == ("compiled-frozen" if freeze else "compiled")
    assert compiled.dynamic_choice == compiled.choice + ", dynamic batch"
    assert compiled.compiles == 2  # batch 2; then one graph for 3, 5 and 9


def test_a_stage_whose_plain_graph_wins_runs_it_for_every_batch_size(collection, monkeypatch):
    def plain_fastest(calls):
        return {name: 1.0 if name.startswith("eager") else 2.0 for name in calls}

    monkeypatch.setattr(compiling, "seconds_per_call", plain_fastest)
    inference = compile_stage(collection, Stage.INFERENCE, compile=True)
    for batch_size in (2, 7):
        assert_like_eager(inference, collection, images(batch_size))
    compiled = inference.compiled
    assert compiled.choice == "eager" and compiled.dynamic_choice == "eager, dynamic batch"
    assert compiled.timings == {"compiled-frozen": 2.0, "compiled": 2.0, "eager": 1.0}
    assert compiled.compiles == 2  # the candidates at batch 2; nothing for batch 7


def test_refreezing_warms_up_the_same_batch_sizes_again(collection):
    inference = compile_stage(collection, Stage.INFERENCE,
                              compile=CompileOptions(freeze=True, fail_on_recompile=True))
    inference.warm_up(images(4), batch_sizes=[1, 2])
    train_step(collection, train_inputs())
    for batch_size in (2, 1, 4):  # no error: the refreeze compiled both ranges again
        assert_like_eager(inference, collection, images(batch_size))


def test_a_refreeze_warms_up_every_range_a_warm_up_compiled(collection):
    inference = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    inference.warm_up(images(4), batch_sizes=[1, 2, 16])
    train_step(collection, train_inputs())
    assert_like_eager(inference, collection, images(5))  # refreezes, for every warmed-up range at once
    compiles = inference.compiled.compiles
    for batch_size in (17, 1, 3):
        assert_like_eager(inference, collection, images(batch_size))
    assert inference.compiled.compiles == compiles


def test_channels_last_keeps_the_batch_axis_dynamic(collection):
    options = CompileOptions(freeze=False, channels_last=True, fail_on_recompile=True)
    inference = compile_stage(collection, Stage.INFERENCE, compile=options)
    inference.warm_up(images(4), batch_sizes=[1, 2, 16])
    for batch_size in (3, 5, 8, 17):  # the marks survive the layout copy: no recompile, so no error
        assert_like_eager(inference, collection, images(batch_size))


def test_a_channels_last_stage_built_under_inference_mode_leaves_the_weights_trainable(collection):
    """Lightning's validate/test/predict run under inference_mode: building such a stage there must not turn
    the shared weights into inference tensors, which training could not use."""
    with torch.inference_mode():
        compile_stage(collection, Stage.TEST, compile=CompileOptions(channels_last=True))
    weight = collection["backbone"].model.conv.weight
    assert not weight.is_inference() and weight.is_contiguous(memory_format=torch.channels_last)
    train_step(collection, train_inputs())
    assert weight.grad is None or not weight.grad.is_inference()


def test_an_eval_stage_measures_how_to_run_and_keeps_the_fastest(collection):
    inference = compile_stage(collection, Stage.INFERENCE, compile=True)
    assert inference.compiled.choice is None
    assert_like_eager(inference, collection, images(2))
    timings = inference.compiled.timings
    assert set(timings) == {"compiled-frozen", "compiled", "eager"} and all(t > 0 for t in timings.values())
    assert inference.compiled.choice == min(timings, key=timings.__getitem__)
    assert_like_eager(inference, collection, images(5))


# ------------------------------------------------------------------------------------------- TRAIN
@pytest.mark.parametrize("momentum", [0.1, None])  # None: a cumulative average, as SWA's BatchNorm update sets
def test_compiled_train_stage_gradients_equal_eager(collection, momentum):
    for module in collection.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
    eager = copy.deepcopy(collection)
    train = compile_stage(collection, Stage.TRAIN, compile=True)
    inputs = train_inputs(6)
    for run in (train, lambda i: eager(i, Stage.TRAIN)):
        out = run(inputs)
        (out["loss_cls"] + out["loss_seg"]).backward()
    named = dict(eager.named_parameters())
    for name, parameter in collection.named_parameters():
        if parameter.grad is None:
            assert named[name].grad is None
            continue
        ok, error, _ = compare_tensors(parameter.grad, named[name].grad)
        assert ok, f"{name}: gradient max abs error {error}"
    for name, buffer in collection.named_buffers():  # BatchNorm statistics moved alike
        assert torch.allclose(buffer.float(), dict(eager.named_buffers())[name].float(), atol=1e-6)


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_compiled_train_stage_draws_eager_dropout_masks():
    """The same seed gives the same masks, so the same loss and gradients (Inductor's own generator would
    draw other masks)."""
    torch.manual_seed(0)
    collection = BrickCollection({"net": BrickTrainable(Noisy(), input_names=["x"], output_names=["y"])})
    eager = copy.deepcopy(collection)
    train = compile_stage(collection, Stage.TRAIN, compile=True)
    x = torch.randn(4, 6)
    for run in (train, lambda i: eager(i, Stage.TRAIN)):
        torch.manual_seed(1)
        run({"x": x})["y"].square().sum().backward()
    for (name, parameter), other in zip(collection.named_parameters(), eager.parameters(), strict=True):
        ok, error, _ = compare_tensors(parameter.grad, other.grad)
        assert ok, f"{name}: gradient max abs error {error}"


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x  # a branch on a tensor's value: no single graph


def test_a_brick_that_cannot_be_captured_is_named_with_what_to_do():
    collection = BrickCollection({"gate": BrickTrainable(Gate(), input_names=["x"], output_names=["y"])})
    stage = compile_stage(collection, Stage.INFERENCE, compile=FROZEN)
    with pytest.raises(Exception) as raised:
        stage({"x": torch.ones(2, 3)})
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "(raised in brick 'gate')" in notes and "torch.cond" in notes


# ------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options", [CompileOptions(), FROZEN, CompileOptions(freeze=False),
                                     CompileOptions(freeze=True, channels_last=True),
                                     CompileOptions(freeze=False, dynamic_batch=False)],
                         ids=["measured", "frozen", "not-frozen", "channels-last", "static-batch"])
def test_every_fast_path_equals_eager(collection, options):
    inference = compile_stage(collection, Stage.INFERENCE, compile=options)
    for batch_size in (1, 4):
        assert_like_eager(inference, collection, images(batch_size))


def test_bfloat16_autocast_is_verified_against_float32_at_its_tolerance(collection):
    inference = compile_stage(collection, Stage.INFERENCE,
                              compile=CompileOptions(freeze=True, autocast=torch.bfloat16))
    got = inference(images(4))
    assert got["logits"].dtype == torch.float32  # outputs keep the stage's dtypes
    assert_like_eager(inference, collection, images(4), dtype=torch.bfloat16)


def test_autocast_is_refused_where_it_does_not_belong(collection):
    with pytest.raises(BrickBackendError, match=r"autocast takes torch\.bfloat16 or torch\.float16"):
        CompileOptions(autocast=torch.float64)
    with pytest.raises(BrickBackendError, match=r"autocast=\.\.\.\) is for eval stages"):
        compile_stage(collection, Stage.TRAIN, compile=CompileOptions(autocast=torch.bfloat16))


def test_metrics_of_a_compiled_stage_match_eager(collection):
    validation = compile_stage(collection, Stage.VALIDATION, compile=True)
    twin = copy.deepcopy(collection)
    for batch_size in (4, 6):
        inputs = train_inputs(batch_size)
        validation(inputs)
        twin(inputs, Stage.VALIDATION)
    assert collection.summarize(Stage.VALIDATION) == twin.summarize(Stage.VALIDATION)


# ------------------------------------------------------------------------------------------- onnxruntime
def test_export_saves_the_optimized_model_beside_the_file(collection, tmp_path):
    import onnxruntime

    from torchbricks_fx import export_onnx
    from torchbricks_fx.ort import ort_session, run_session

    report = export_onnx(collection, tmp_path / "m.onnx", images(2), stage=Stage.INFERENCE, outputs=["logits"],
                         save_optimized=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.optimized.onnx"]
    assert report.file_size_bytes == (tmp_path / "m.onnx").stat().st_size
    session = ort_session(tmp_path / "m.optimized.onnx", threads=1)
    options = session.get_session_options()
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1
    inputs = images(3)
    ok, error, _ = compare_tensors(run_session(session, inputs)["logits"], collection(inputs, "inference")["logits"])
    assert ok, error


def test_compiling_leaves_the_callers_tensors_unmarked(collection):
    """Dynamic-batch marks on the caller's tensors would make every later compile that sees them dynamic."""
    inference = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=False))
    inputs = images(3)
    inference(inputs)
    assert not hasattr(inputs["raw"], "_dynamo_weak_dynamic_indices")
    assert not hasattr(inputs["raw"], "_dynamo_dynamic_indices")


def test_a_static_batch_stage_refuses_batch_sizes_past_dynamos_limit(collection):
    """Dynamo would run them eagerly, silently."""
    import torch._dynamo.config

    inference = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=False, dynamic_batch=False))
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch_size in (1, 2):
            assert_like_eager(inference, collection, images(batch_size))
        refused = r"for 2 batch sizes \(\[1, 2\]\).*batch size 3 would run uncompiled"
        with pytest.raises(BrickBackendError, match=refused):
            inference(images(3))


def test_fail_on_recompile_compiles_the_dynamic_batch_graph_on_the_first_call(collection):
    inference = compile_stage(collection, Stage.INFERENCE,
                              compile=CompileOptions(freeze=True, fail_on_recompile=True))
    assert_like_eager(inference, collection, images(4))  # the first call: batch 4, and the graph for 2-15
    compiles = inference.compiled.compiles
    for batch_size in (6, 3, 4):
        assert_like_eager(inference, collection, images(batch_size))
    assert inference.compiled.compiles == compiles == 2
    assert inference.compiled.dynamic_choice == "compiled-frozen, dynamic batch"


# ------------------------------------------------------------------------------------------- review fixes
def both_slots_frozen(calls):
    return {name: 1.0 if name.startswith("compiled-frozen") else 2.0 for name in calls}


def test_a_new_batch_size_after_a_weight_change_leaves_no_stale_graph_behind(collection, monkeypatch):
    monkeypatch.setattr(compiling, "seconds_per_call", both_slots_frozen)
    inference = compile_stage(collection, Stage.INFERENCE, compile=True)
    assert_like_eager(inference, collection, images(4))
    with torch.no_grad():
        for parameter in collection.parameters():
            parameter.add_(0.5)
    assert_like_eager(inference, collection, images(7))  # the dynamic-batch graph, compiled on new weights
    assert_like_eager(inference, collection, images(4))  # the batch-4 graph, refrozen


def test_warming_the_dynamic_graph_up_leaves_train_state_alone(collection):
    twin = copy.deepcopy(collection)
    train = compile_stage(collection, Stage.TRAIN, compile=CompileOptions(fail_on_recompile=True))
    train(train_inputs(4))  # runs the batch-4 graph, then compiles the dynamic-batch one on the same inputs
    twin(train_inputs(4), Stage.TRAIN)
    bn, twin_bn = collection["backbone"].model.bn, twin["backbone"].model.bn
    assert bn.num_batches_tracked.item() == twin_bn.num_batches_tracked.item() == 1
    assert torch.allclose(bn.running_mean, twin_bn.running_mean, atol=1e-6)


def test_refresh_warms_up_again_on_the_next_call(collection):
    inference = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(freeze=True, fail_on_recompile=True))
    inference.warm_up(images(2), batch_sizes=[2, 16])
    inference.refresh()
    for batch_size in (2, 5, 16):  # no "would recompile": the next call compiled every warmed-up size again
        assert_like_eager(inference, collection, images(batch_size))


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x * 2


def test_a_stage_that_changes_its_own_buffers_is_never_frozen():
    def counting_collection() -> BrickCollection:
        return BrickCollection({"count": BrickTrainable(Counting(), input_names=["raw"], output_names=["out"])})

    frozen = compile_stage(counting_collection(), Stage.INFERENCE, compile=FROZEN)
    with pytest.raises(BrickBackendError, match=r"changes count\.calls while it runs.*freeze=False"):
        frozen(images(2))
    measured = compile_stage(counting_collection(), Stage.INFERENCE, compile=True)
    inputs = images(2)
    assert torch.equal(measured(inputs)["out"], inputs["raw"] * 2)
    assert "compiled-frozen" not in measured.compiled.timings


def test_autocast_stages_never_run_the_plain_float32_graph(collection):
    inference = compile_stage(collection, Stage.INFERENCE, compile=CompileOptions(autocast=torch.bfloat16))
    inference(images(2))
    assert set(inference.compiled.timings) == {"compiled-frozen", "compiled"}


def test_a_refused_batch_size_leaves_no_trace(collection):
    inference = compile_stage(collection, Stage.INFERENCE,
                              compile=CompileOptions(freeze=False, dynamic_batch=False, fail_on_recompile=True))
    inference(images(4))
    with pytest.raises(BrickBackendError, match="would recompile after warm-up"):
        inference(images(8))
    assert inference.compiled.batch_sizes == (4,)
