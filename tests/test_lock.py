"""Stage lockfiles: lock, write_lock/read_lock, diff_locks, and the lock/check commands."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchbricks_fx import (
    BrickCollection,
    BrickLockError,
    BrickLoss,
    BrickTrainable,
    Lock,
    LockChange,
    Stage,
    diff_locks,
    lock,
    read_lock,
    write_lock,
)
from torchbricks_fx.cli import cmd_lock, main
from torchbricks_fx.lockfile_diff import render_lock_diff
from torchbricks_fx.lockfile_format import SCHEMA, OnnxLock
from torchbricks_fx.plan import FrozenMap

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cli_model.py"
EXAMPLE_LOCK = ROOT / "examples" / "cli_model.lock.json"
ALL_STAGES = [stage.value for stage in Stage]
LOSS_STAGES = ["train", "validation", "test"]


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("cli_model_for_lock_tests", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_model = _load_example()


def build() -> tuple[BrickCollection, dict[str, torch.Tensor]]:
    collection, named_inputs = cli_model.build()
    return collection, named_inputs


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def changes_after(change: Callable[[BrickCollection, dict[str, torch.Tensor]], Any]) -> list[LockChange]:
    """The changes reported between the example's lock and its lock after ``change(collection, inputs)``."""
    collection, named_inputs = build()
    before = lock(collection, named_inputs)
    change(collection, named_inputs)
    return diff_locks(before, lock(collection, named_inputs))


def stages_with(changes: list[LockChange], **fields: Any) -> list[str]:
    """The stages (in order) of the changes whose fields equal ``fields``."""
    found = [c.stage for c in changes if all(getattr(c, key) == value for key, value in fields.items())]
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------------------------------- unchanged
def test_an_unchanged_collection_has_no_changes_and_check_passes(capsys, tmp_path):
    first, second = lock(*build()), lock(*build())
    assert first == second and diff_locks(first, second) == []
    assert render_lock_diff([]) == "no changes"

    path = tmp_path / "bricks.lock.json"
    code, _, err = run_cli(capsys, "lock", str(EXAMPLE), "-o", str(path))
    assert code == 0 and f"wrote {path}: 5 stages, 4 bricks" in err
    assert read_lock(path) == first
    code, out, _ = run_cli(capsys, "check", str(EXAMPLE), "--lock", str(path))
    assert code == 0 and "matches" in out


def test_the_lock_records_each_stage_and_each_running_brick():
    recorded = lock(*build())
    assert recorded.schema == SCHEMA and list(recorded.stages) == ALL_STAGES
    inference = recorded.stages["inference"]
    assert inference.bricks == ("preprocessor", "backbone", "head")
    assert inference.required_inputs == ("raw",)
    assert inference.outputs == ("normalized", "features", "logits", "probabilities")
    assert dict(inference.pruned) == {"loss": "dead in stage inference"}
    assert inference.values["raw"].shape == ("batch", 3, 16, 16)  # the batch axis is symbolic
    assert inference.values["logits"].describe() == "[batch, 3] float32"
    assert recorded.stages["train"].values["loss_ce"].shape == ()
    assert recorded.stages["train"].values["targets"].dtype == "int64"
    assert len(inference.graph_sha256 or "") == 64
    head = recorded.bricks["head"]
    assert (head.brick_class, head.module_class, head.calculate_gradients) == ("BrickTrainable", "Head", True)
    assert head.parameter_count == 27 and head.parameters["fc.weight"].shape == (3, 8)
    assert dict(head.submodules) == {"fc": "Linear"} and head.inputs == ("features",)
    assert recorded.bricks["preprocessor"].parameters == {}
    assert recorded.onnx is None


def test_lock_leaves_the_collection_and_random_state_as_they_were(multitask, multitask_inputs):
    multitask.train()
    running_mean = multitask["backbone"].model.bn.running_mean.clone()
    rng = torch.random.get_rng_state()
    recorded = lock(multitask, multitask_inputs)
    assert torch.equal(multitask["backbone"].model.bn.running_mean, running_mean)  # TRAIN ran, stats restored
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(module.training for module in multitask.modules())
    # Nested names, metric bricks and keyword bindings are recorded like any other brick.
    assert recorded.stages["train"].bricks[-1] == "accuracy"
    assert recorded.bricks["accuracy"].module_class == "MetricCollection"
    assert dict(recorded.bricks["loss_cls"].inputs) == {"input": "logits", "target": "labels"}
    assert recorded.bricks["heads.classifier"].outputs == ("logits", "prediction")
    assert recorded.bricks["backbone"].buffers["bn.running_mean"].shape == (8,)


def test_metric_states_are_restored(multitask, multitask_inputs):
    multitask(multitask_inputs, Stage.VALIDATION)
    metric = multitask["accuracy"].metrics["VALIDATION"]
    updates = metric["MulticlassAccuracy"]._update_count
    lock(multitask, multitask_inputs)
    assert metric["MulticlassAccuracy"]._update_count == updates


# ------------------------------------------------------------------------------------------- each change
def test_a_brick_added_is_reported_in_every_stage_it_runs_in():
    def add(collection: BrickCollection, _: Any) -> None:
        collection["extra"] = BrickTrainable(nn.Linear(3, 2), input_names=["logits"], output_names=["extra"])

    changes = changes_after(add)
    assert stages_with(changes, subject="brick", name="extra", what="added") == ALL_STAGES
    assert stages_with(changes, subject="value", name="extra", brick="extra", what="added") == ALL_STAGES
    assert stages_with(changes, subject="output", name="extra") == ALL_STAGES
    assert "brick 'extra' now runs (new brick)" in render_lock_diff(changes)


def test_a_brick_removed_is_reported_where_it_ran_and_where_it_was_pruned():
    def remove(collection: BrickCollection, _: Any) -> None:
        del collection["loss"]

    changes = changes_after(remove)
    assert stages_with(changes, subject="brick", name="loss", what="removed") == LOSS_STAGES
    assert stages_with(changes, subject="input", name="targets", what="removed") == LOSS_STAGES
    assert stages_with(changes, subject="output", name="loss_ce", brick="loss", what="removed") == LOSS_STAGES
    assert stages_with(changes, subject="brick", name="loss", what="pruned") == ["inference", "export"]
    assert "brick 'loss' no longer runs (removed from the collection)" in render_lock_diff(changes)


def test_a_brick_moved_to_other_stages_is_reported_in_the_stages_it_left():
    def move(collection: BrickCollection, _: Any) -> None:
        collection["head"].alive_stages = [Stage.TRAIN, Stage.VALIDATION, Stage.TEST]

    changes = changes_after(move)
    assert {c.stage for c in changes} == {"inference", "export"}
    assert stages_with(changes, subject="brick", name="head", what="removed") == ["inference", "export"]
    assert stages_with(changes, subject="output", name="logits", brick="head", what="removed") == ["inference",
                                                                                                  "export"]
    assert "brick 'head' no longer runs (dead in stage export)" in render_lock_diff(changes)


def test_an_input_renamed_is_reported_with_the_brick_reading_it():
    def rename(collection: BrickCollection, named_inputs: dict[str, torch.Tensor]) -> None:
        collection["preprocessor"].input_names = ["image"]
        named_inputs["image"] = named_inputs.pop("raw")

    changes = changes_after(rename)
    assert stages_with(changes, subject="input", name="raw", what="removed") == ALL_STAGES
    assert stages_with(changes, subject="input", name="image", what="added", brick="preprocessor") == ALL_STAGES
    assert stages_with(changes, subject="brick", name="preprocessor", what="inputs", before="['raw']",
                       after="['image']") == ALL_STAGES


def test_a_layer_width_changed_is_reported_with_its_parameters_and_values():
    def widen(collection: BrickCollection, _: Any) -> None:
        collection["backbone"].model.conv[0] = nn.Conv2d(3, 16, 3, padding=1)
        collection["head"].model.fc = nn.Linear(16, 3)

    changes = changes_after(widen)
    assert stages_with(changes, subject="brick", name="backbone", what="parameter 'conv.0.weight'",
                       before="[8, 3, 3, 3] float32", after="[16, 3, 3, 3] float32") == ALL_STAGES
    assert stages_with(changes, subject="brick", name="head", what="parameter 'fc.weight'") == ALL_STAGES
    assert stages_with(changes, subject="value", name="features", brick="backbone", what="shape") == ALL_STAGES
    assert stages_with(changes, subject="value", name="logits") == []  # unchanged
    text = render_lock_diff(changes)
    assert text.startswith("stages train, validation, test, inference and export:\n")
    assert "brick 'backbone': parameter 'conv.0.weight' shape [8, 3, 3, 3] -> [16, 3, 3, 3]" in text
    assert "value 'features' (from brick 'backbone'): shape [batch, 8] -> [batch, 16]" in text


def test_an_output_dtype_changed_is_reported_naming_the_producing_brick():
    def to_double(collection: BrickCollection, _: Any) -> None:
        collection["head"].model.register_forward_hook(lambda module, args, out: tuple(t.double() for t in out))

    changes = changes_after(to_double)
    assert stages_with(changes, subject="value", name="probabilities", brick="head", what="dtype",
                       before="[batch, 3] float32", after="[batch, 3] float64") == ALL_STAGES
    assert stages_with(changes, subject="brick") == []  # the structure did not change, only what it computes
    assert "value 'logits' (from brick 'head'): dtype float32 -> float64" in render_lock_diff(changes)


def test_calculate_gradients_flipped_is_reported_in_every_stage_of_the_brick():
    def freeze(collection: BrickCollection, _: Any) -> None:
        collection["backbone"].calculate_gradients = False

    changes = changes_after(freeze)
    assert stages_with(changes, subject="brick", name="backbone", what="calculate_gradients", before="True",
                       after="False") == ALL_STAGES
    assert len(changes) == len(ALL_STAGES)


def test_a_submodule_class_changed_is_reported():
    def swap(collection: BrickCollection, _: Any) -> None:
        collection["backbone"].model.conv[1] = nn.GELU()

    changes = changes_after(swap)
    assert [c.message for c in changes if c.stage == "train"] == ["brick 'backbone': submodule 'conv.1' ReLU -> GELU"]


def test_a_stage_that_becomes_invalid_is_recorded_with_its_problems():
    def kill_backbone(collection: BrickCollection, _: Any) -> None:
        collection["backbone"].alive_stages = [Stage.TRAIN]

    collection, named_inputs = build()
    kill_backbone(collection, named_inputs)
    recorded = lock(collection, named_inputs)
    assert recorded.stages["train"].problems == ()
    assert "its producer 'backbone' is not alive there" in recorded.stages["inference"].problems[0]
    assert read_lock_roundtrip(recorded) == recorded
    changes = changes_after(kill_backbone)
    assert stages_with(changes, subject="stage", what="invalid") == ["validation", "test", "inference", "export"]


def test_a_stage_that_cannot_run_on_the_examples_records_why():
    collection, named_inputs = build()
    recorded = lock(collection, {"raw": named_inputs["raw"]})  # no targets: the loss stages cannot run
    for stage in LOSS_STAGES:
        assert recorded.stages[stage].values == {}
        assert "Input 'targets' needed by brick 'loss'" in (recorded.stages[stage].values_not_recorded or "")
        assert recorded.stages[stage].bricks == ("preprocessor", "backbone", "head", "loss")
    assert recorded.stages["inference"].values_not_recorded is None
    changes = diff_locks(lock(collection, named_inputs), recorded)
    assert stages_with(changes, subject="stage", what="values_not_recorded") == LOSS_STAGES


def test_a_brick_that_raises_on_the_examples_is_recorded_not_raised():
    collection, named_inputs = build()
    collection["head"].model.fc = nn.Linear(5, 3)  # no longer fits the backbone's 8 features
    recorded = lock(collection, named_inputs)
    reason = recorded.stages["inference"].values_not_recorded or ""
    assert reason.startswith("RuntimeError:") and "(raised in brick 'head')" in reason


# ------------------------------------------------------------------------------------------- files
def read_lock_roundtrip(recorded: Lock) -> Lock:
    return Lock.from_json(recorded.to_json())


def test_the_file_is_sorted_readable_json_that_reads_back_equal(tmp_path):
    recorded = lock(*build())
    path = write_lock(recorded, tmp_path / "sub" / "bricks.lock.json")
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and text == recorded.to_json()
    assert read_lock(path) == recorded

    def keys_sorted(value: Any) -> bool:
        if isinstance(value, dict):
            return list(value) == sorted(value) and all(keys_sorted(v) for v in value.values())
        return all(keys_sorted(v) for v in value) if isinstance(value, list) else True

    data = json.loads(text)
    assert keys_sorted(data) and data["schema"] == SCHEMA
    assert '"shape": ["batch", 3, 16, 16]' in text  # short lists stay on one line


def test_the_bundled_example_lock_is_current(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "check", str(EXAMPLE), "--lock", str(EXAMPLE_LOCK))
    assert code == 0, out
    regenerated = tmp_path / "cli_model.lock.json"
    assert run_cli(capsys, "lock", str(EXAMPLE), "-o", str(regenerated))[0] == 0
    assert regenerated.read_bytes() == EXAMPLE_LOCK.read_bytes()


def _python_m(*argv: str, cwd: Path, hash_seed: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torchbricks_fx", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_processes_with_different_hash_seeds_write_identical_files(tmp_path):
    written = []
    for seed in ("1", "2"):
        path = tmp_path / f"seed{seed}.lock.json"
        done = _python_m("lock", str(EXAMPLE), "-o", str(path), cwd=tmp_path, hash_seed=seed)
        assert done.returncode == 0, done.stderr
        written.append(path.read_bytes())
    assert written[0] == written[1] == EXAMPLE_LOCK.read_bytes()


# ------------------------------------------------------------------------------------------- check
def test_check_prints_a_per_stage_diff_and_exits_1(capsys, tmp_path):
    changed = tmp_path / "model.py"
    changed.write_text(EXAMPLE.read_text().replace('"head": BrickTrainable(Head(),',
                                                   '"head": BrickTrainable(Head(num_classes=4),'))
    code, out, err = run_cli(capsys, "check", str(changed), "--lock", str(EXAMPLE_LOCK))
    assert code == 1
    assert out.startswith("stages train, validation, test, inference and export:\n")
    assert "  - brick 'head': parameter 'fc.weight' shape [3, 8] -> [4, 8]\n" in out
    assert "  - value 'logits' (from brick 'head'): shape [batch, 3] -> [batch, 4]\n" in out
    assert f"regenerate the lock and commit it: torchbricks-fx lock {changed} -o {EXAMPLE_LOCK}" in err


def test_lock_replaces_a_lock_file_and_prints_what_changed(capsys, tmp_path):
    path = tmp_path / "bricks.lock.json"
    path.write_bytes(EXAMPLE_LOCK.read_bytes())
    code, out, _ = run_cli(capsys, "lock", str(EXAMPLE), "-o", str(path))
    assert code == 0 and out == f"{path} is unchanged.\n"
    changed = tmp_path / "model.py"
    changed.write_text(EXAMPLE.read_text().replace('"loss": BrickLoss(',
                                                   '"loss": BrickLoss(alive_stages=["train"], model='))
    code, out, _ = run_cli(capsys, "lock", str(changed), "-o", str(path))
    assert code == 0 and out.startswith(f"changes from the previous {path}:\nstage validation:\n")
    assert "brick 'loss' no longer runs (dead in stage validation)" in out


def test_lock_refuses_to_replace_a_file_that_is_not_a_lock(capsys, tmp_path):
    precious = tmp_path / "model.py"
    precious.write_text("print('my model')\n")
    code, _, err = run_cli(capsys, "lock", str(EXAMPLE), "-o", str(precious))
    assert code == 1 and "is not a lock file; pass --overwrite" in err
    assert precious.read_text() == "print('my model')\n"
    assert run_cli(capsys, "lock", str(EXAMPLE), "-o", str(precious), "--overwrite")[0] == 0
    assert read_lock(precious) == read_lock(EXAMPLE_LOCK)


def _with_schema(schema: str) -> str:
    data = json.loads(EXAMPLE_LOCK.read_text())
    data["schema"] = schema
    return json.dumps(data)


@pytest.mark.parametrize(("content", "fragments"), [
    (None, ["No lock file", "torchbricks-fx lock "]),
    ("{not json", ["is not a lock file: it is not valid JSON"]),
    ('{"results": []}', ["is not a torchbricks_fx lock file", f"expected {SCHEMA!r}"]),
    (_with_schema("torchbricks_fx.lock/0"), ["has lock schema 'torchbricks_fx.lock/0'", "Regenerate it"]),
    (_with_schema("torchbricks_fx.lock/1"), ["has lock schema 'torchbricks_fx.lock/1'", "Regenerate it"]),
    (f'{{"schema": "{SCHEMA}", "stages": {{}}}}', ["not a well-formed lock file (missing key 'bricks')"]),
    (f'{{"schema": "{SCHEMA}", "bricks": {{}}, "stages": {{"train": {{"bricks": ["a"]}}}}}}',
     ["not a well-formed lock file"]),
    (EXAMPLE_LOCK.read_text().replace('"parameter_count": 27', '"parameter_count": "27"'),
     ["not a well-formed lock file", "bricks.head: expected an integer, found '27'"]),
    # A string where a list belongs is not read as a list of characters.
    (EXAMPLE_LOCK.read_text().replace('"outputs": ["normalized", "features", "logits", "probabilities"],\n'
                                      '      "pruned": {"loss": "dead in stage inference"}',
                                      '"outputs": "logits",\n      "pruned": {"loss": "dead in stage inference"}'),
     ["not a well-formed lock file (stages.inference.outputs: expected a list, found 'logits')"]),
    (EXAMPLE_LOCK.read_text().replace('"shape": [3, 8]', '"shape": "38"'),
     ["(bricks.head.parameters.fc.weight.shape: expected a list, found '38')"]),
], ids=["missing", "not-json", "other-json", "schema-0", "schema-1", "no-bricks", "unknown-brick", "string-count",
        "string-outputs", "string-shape"])
def test_unusable_lock_files_exit_2_naming_the_file(capsys, tmp_path, content, fragments):
    path = tmp_path / "bricks.lock.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BrickLockError, match=r"bricks\.lock\.json"):
        read_lock(path)
    code, out, err = run_cli(capsys, "check", str(EXAMPLE), "--lock", str(path))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("torchbricks-fx check: error: ") and str(path) in err
    for fragment in fragments:
        assert fragment in err


def test_check_with_an_unusable_build_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "check", str(tmp_path / "missing.py"), "--lock", str(EXAMPLE_LOCK))
    assert code == 2 and "No such file" in err


def test_lock_refuses_what_is_not_a_collection():
    with pytest.raises(BrickLockError, match="takes a BrickCollection, not dict"):
        lock({"a": 1}, {})  # type: ignore[arg-type]
    with pytest.raises(BrickLockError, match="named_inputs as a dict"):
        lock(build()[0], [1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.slow
def test_onnx_operator_histogram_of_the_export_stage(capsys, tmp_path):
    collection, named_inputs = build()
    recorded = lock(collection, named_inputs, onnx_ops=True)
    assert recorded.onnx is not None and isinstance(recorded.onnx.opset, int)
    assert {"Conv", "Gemm", "Relu", "Softmax"} <= set(recorded.onnx.operators)
    assert set(recorded.onnx.exporter) == {"torch", "onnx", "onnxscript"}
    assert read_lock_roundtrip(recorded) == recorded

    upgraded = dataclasses.replace(recorded.onnx, exporter={"torch": "99.0"})
    assert diff_locks(recorded, dataclasses.replace(recorded, onnx=upgraded)) == []  # versions alone: no change
    operators = {**recorded.onnx.operators, "Relu": 0, "Gelu": 1}
    changed = dataclasses.replace(upgraded, operators=operators)
    changes = diff_locks(recorded, dataclasses.replace(recorded, onnx=changed))
    assert [(c.stage, c.subject, c.name) for c in changes] == [("export", "onnx", "Gelu"), ("export", "onnx", "Relu"),
                                                              ("export", "onnx", "exporter")]
    assert stages_with(diff_locks(recorded, lock(collection, named_inputs)), subject="onnx") == ["export"]

    path = tmp_path / "bricks.lock.json"
    write_lock(recorded, path)
    code, out, _ = run_cli(capsys, "check", str(EXAMPLE), "--lock", str(path))  # exports again: the lock has ops
    assert code == 0, out


def test_a_changed_execution_order_is_reported():
    def pair(first: str, second: str) -> BrickCollection:
        bricks = {"linear": BrickTrainable(nn.Linear(2, 2), input_names=["x"], output_names=["y"]),
                  "everything": BrickTrainable(lambda values: len(values), input_names="all", output_names=["n"])}
        return BrickCollection({first: bricks[first], second: bricks[second]})

    inputs = {"x": torch.randn(3, 2)}
    before, after = lock(pair("linear", "everything"), inputs), lock(pair("everything", "linear"), inputs)
    assert before.bricks["everything"].inputs == "all" and before.stages["train"].values["n"].type == "int"
    assert read_lock_roundtrip(before) == before
    changes = diff_locks(before, after)
    messages = [c.message for c in changes if c.stage == "inference"]
    assert messages == ["execution order changed: linear -> everything => everything -> linear",
                        "output order changed: y -> n => n -> y"]


# ------------------------------------------------------------------------------------------- review fixes
class Subtract(nn.Module):
    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return b - a


KEYWORD_BUILD = '''
import torch
from torch import nn
from torchbricks_fx import BrickCollection, BrickTrainable

class Subtract(nn.Module):
    def forward(self, b, a):
        return b - a

def build():
    brick = BrickTrainable(Subtract(), input_names={"b": "x", "a": "y"}, output_names=["d"])
    return BrickCollection({"sub": brick}), {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}
'''


def test_keyword_inputs_not_in_alphabetical_order_pass_check(capsys, tmp_path):
    collection = BrickCollection({"sub": BrickTrainable(Subtract(), input_names={"b": "x", "a": "y"},
                                                        output_names=["d"])})
    named_inputs = {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}
    path = write_lock(lock(collection, named_inputs), tmp_path / "kw.lock.json")
    assert diff_locks(read_lock(path), lock(collection, named_inputs)) == []

    build_file = tmp_path / "kw_model.py"
    build_file.write_text(KEYWORD_BUILD)
    assert run_cli(capsys, "lock", str(build_file), "-o", str(path))[0] == 0
    code, out, _ = run_cli(capsys, "check", str(build_file), "--lock", str(path))
    assert code == 0, out


def test_exporter_versions_are_shown_in_the_same_order_whatever_their_order():
    recorded = lock(*build())
    onnx = OnnxLock(17, FrozenMap({"Relu": 1}), FrozenMap({"torch": "2.0", "onnx": "1.0"}))
    upgraded = OnnxLock(17, FrozenMap({"Relu": 2}), FrozenMap({"onnx": "1.0", "torch": "2.1"}))
    changes = diff_locks(dataclasses.replace(recorded, onnx=onnx), dataclasses.replace(recorded, onnx=upgraded))
    assert changes[-1].message == ("(exporter versions {'onnx': '1.0', 'torch': '2.0'} -> "
                                   "{'onnx': '1.0', 'torch': '2.1'})")


BACKBONE_NOT_IN_EXPORT = ('"backbone": BrickTrainable(', '"backbone": BrickTrainable(alive_stages=["train", '
                          '"validation", "test", "inference"], model=')


@pytest.mark.slow
def test_an_export_stage_made_invalid_shows_in_the_onnx_diff_not_as_a_crash(capsys, tmp_path):
    path = tmp_path / "bricks.lock.json"
    assert run_cli(capsys, "lock", str(EXAMPLE), "-o", str(path), "--onnx-ops")[0] == 0
    changed = tmp_path / "model.py"
    changed.write_text(EXAMPLE.read_text().replace(*BACKBONE_NOT_IN_EXPORT))
    code, out, _ = run_cli(capsys, "check", str(changed), "--lock", str(path))
    assert code == 1
    assert out.startswith("stage export:\n  - the stage is now invalid (it ran preprocessor -> backbone -> head)\n")
    assert "  - no ONNX operator histogram: stage export is invalid\n" in out

    code, _, err = run_cli(capsys, "lock", str(changed), "-o", str(path), "--onnx-ops")
    assert code == 0 and "warning: no ONNX operator histogram: stage export is invalid" in err
    recorded = read_lock(path).onnx
    assert recorded is not None and recorded.not_exported == "stage export is invalid"
    assert recorded.operators == {} and recorded.opset is None


def test_lazy_modules_are_locked_with_their_shapes_after_the_stages_ran():
    collection = BrickCollection({"encoder": BrickTrainable(nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d()),
                                                            input_names=["x"], output_names=["y"])})
    named_inputs = {"x": torch.randn(2, 3)}
    recorded = lock(collection, named_inputs)
    encoder = recorded.bricks["encoder"]
    assert encoder.parameters["0.weight"].shape == (4, 3) and encoder.parameter_count == 16 + 8
    assert diff_locks(recorded, lock(collection, named_inputs)) == []
    norm = collection["encoder"].model[1]  # its statistics as initialized: the TRAIN run left no trace
    assert norm.running_mean.eq(0).all() and norm.running_var.eq(1).all() and norm.num_batches_tracked == 0


@pytest.mark.parametrize(("module", "named_inputs", "fragment"), [
    (nn.LazyLinear(4), {}, "'weight' is uninitialized (a lazy module): a stage did not run on the "
                           "example inputs (Input 'x'"),
    (nn.LazyBatchNorm1d(), {}, "'weight' is uninitialized (a lazy module)"),
])
def test_lazy_modules_that_cannot_be_locked_raise_naming_the_brick(module, named_inputs, fragment):
    collection = BrickCollection({"encoder": BrickTrainable(module, input_names=["x"], output_names=["y"])})
    with pytest.raises(BrickLockError, match="Brick 'encoder'") as raised:
        lock(collection, named_inputs)
    assert fragment in str(raised.value)


class Scores(nn.Module):
    def __init__(self, classes: int = 3, dtype: torch.dtype = torch.float32, extra: bool = False) -> None:
        super().__init__()
        self.fc, self.dtype, self.extra = nn.Linear(2, classes), dtype, extra

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        scores = self.fc(x)
        out: dict[str, Any] = {"scores": scores.to(self.dtype), "pair": [scores, scores.sum(1)]}
        if self.extra:
            out["extra"] = (scores,)
        return out


def scores_lock(**options: Any) -> Lock:
    collection = BrickCollection({"scores": BrickTrainable(Scores(**options), input_names=["x"],
                                                           output_names=["out"])})
    return lock(collection, {"x": torch.randn(4, 2)})


def test_values_inside_dicts_and_lists_are_locked_and_their_changes_reported():
    recorded = scores_lock()
    out = recorded.stages["inference"].values["out"]
    assert out.type == "dict" and isinstance(out.items, Mapping) and list(out.items) == ["pair", "scores"]
    assert out.items["scores"].describe() == "[batch, 3] float32"
    assert [item.describe() for item in out.items["pair"].items or ()] == ["[batch, 3] float32", "[batch] float32"]
    assert read_lock_roundtrip(recorded) == recorded

    changes = diff_locks(recorded, scores_lock(dtype=torch.float16, extra=True))
    assert stages_with(changes, subject="value", name="out['scores']", brick="scores", what="dtype") == ALL_STAGES
    text = render_lock_diff(changes)
    assert "  - value 'out'['scores'] (from brick 'scores'): dtype float32 -> float16\n" in text
    assert "  - value 'out'['extra'] (from brick 'scores') added (tuple)\n" in text
    assert "'out'['extra'][0]" not in text  # the items of an added value are not listed again
    wider = render_lock_diff(diff_locks(recorded, scores_lock(classes=5)))
    assert "value 'out'['pair'][0] (from brick 'scores'): shape [batch, 3] -> [batch, 5]" in wider


class KeyedByNumberAndText(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[Any, torch.Tensor]:
        return {1: x, "1": x.sum(1), 2: x}


def test_dict_keys_whose_text_is_the_same_are_kept_apart_in_the_lock():
    collection = BrickCollection({"keyed": BrickTrainable(KeyedByNumberAndText(), input_names=["x"],
                                                          output_names=["out"])})
    recorded = lock(collection, {"x": torch.randn(4, 2)})
    items = recorded.stages["inference"].values["out"].items
    assert isinstance(items, Mapping)
    assert {key: item.describe() for key, item in items.items()} == {
        "1": "[batch] float32", "1 (int)": "[batch, 2] float32", "2": "[batch, 2] float32"}
    assert read_lock_roundtrip(recorded) == recorded


def test_which_outputs_count_as_losses_is_locked():
    def with_auxiliary_loss(counted: str) -> BrickCollection:
        collection, _ = build()
        collection["auxiliary"] = BrickLoss(nn.CrossEntropyLoss(), input_names=["logits", "targets"],
                                            output_names=["loss_aux"], loss_output_names=counted)
        return collection

    named_inputs = build()[1]
    recorded = lock(with_auxiliary_loss("all"), named_inputs)
    assert recorded.bricks["auxiliary"].loss_output_names == ("loss_aux",)
    assert recorded.bricks["head"].loss_output_names == ()
    changes = diff_locks(recorded, lock(with_auxiliary_loss("none"), named_inputs))
    assert stages_with(changes, subject="brick", name="auxiliary", what="loss_output_names") == LOSS_STAGES
    assert "brick 'auxiliary': loss outputs ['loss_aux'] -> []" in render_lock_diff(changes)


def test_lock_overwrite_over_a_lock_file_still_prints_what_changed(capsys, tmp_path):
    path = tmp_path / "bricks.lock.json"
    path.write_bytes(EXAMPLE_LOCK.read_bytes())
    changed = tmp_path / "model.py"
    changed.write_text(EXAMPLE.read_text().replace("Head(),", "Head(num_classes=4),"))
    code, out, _ = run_cli(capsys, "lock", str(changed), "-o", str(path), "--overwrite")
    assert code == 0 and out.startswith(f"changes from the previous {path}:\n")
    assert "brick 'head': parameter 'fc.weight' shape [3, 8] -> [4, 8]" in out


def test_output_and_lock_file_refusals_answer_without_importing_torch(tmp_path):
    precious, folder = tmp_path / "model.py", tmp_path / "locks"
    precious.write_text("print('my model')\n")
    folder.mkdir()
    argvs = [["lock", str(EXAMPLE), "-o", str(precious)], ["check", str(EXAMPLE), "--lock", str(folder)]]
    script = ("import json, sys\nsys.modules['torch'] = None  # importing torch now fails\n"
              "from torchbricks_fx.cli import main\nprint(json.dumps([main(a) for a in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert json.loads(done.stdout) == [1, 2], done.stderr
    assert f"{precious} exists and is not a lock file; pass --overwrite" in done.stderr
    assert f"'{folder}' is a folder, not a lock file" in done.stderr and "No lock file" not in done.stderr
    assert precious.read_text() == "print('my model')\n"
    assert SCHEMA.startswith(cmd_lock.SCHEMA_PREFIX)


def test_a_lock_file_that_cannot_be_written_is_a_lock_error_naming_it(capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder where no file can be created")
    with pytest.raises(BrickLockError, match=r"^Cannot write /proc/x\.lock\.json: ") as raised:
        write_lock(lock(*build()), "/proc/x.lock.json")
    assert ".tbfx" not in str(raised.value)
    code, _, err = run_cli(capsys, "lock", str(EXAMPLE), "-o", "/proc/x.lock.json")
    assert code == 2 and "Cannot write /proc/x.lock.json: " in err and ".tbfx" not in err
