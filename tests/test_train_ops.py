"""Running st train as a cluster user does: out-of-memory messages, batch_per_device,
checkpoint permissions and retention, --resume auto, data.channels."""

import pytest
import torch
from safetensors.torch import load_file

import stcli.train as train_mod
from stcli.cli import main
from stcli.recipe import load_recipe
from stcli.train import train


def st(*args) -> int:
    """Run `st ARGS` in this process; the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_is_one_message_with_the_settings_and_what_to_change(
        tiny_recipe, monkeypatch, capsys, error):
    real, calls = train_mod.Trainer.train_step, []

    def fails_at_step_2(self, *args, **kwargs):
        calls.append(self.step)
        if self.step == 1:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Trainer, "train_step", fails_at_step_2)
    path = tiny_recipe("oom", train={"micro_batches": 2, "ckpt_every": 1})
    assert st("train", path) == 2 and calls == [0, 1]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in ("out of memory on cpu at step 2", "train.batch_size=16 over 1 process(es)",
                 "train.micro_batches=2 pass(es) of 8 images", "train.precision=fp32",
                 "train.batch_per_device=4", "train.precision=bf16", "checkpoint"):
        assert part in " ".join(err.split()), (part, err)


def test_other_runtime_errors_are_not_disguised_as_out_of_memory(tiny_recipe, monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train_mod.Trainer, "train_step", fails)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(load_recipe(tiny_recipe("other")))


def test_batch_per_device_sets_the_micro_batches(tiny_recipe):
    by_count = train(load_recipe(tiny_recipe("count", train={"steps": 2, "micro_batches": 4})))
    by_size = train(load_recipe(tiny_recipe("size", train={"steps": 2, "batch_per_device": 4})))
    a = load_file(by_count.out_dir / "ckpt.safetensors")
    b = load_file(by_size.out_dir / "ckpt.safetensors")
    one = train(load_recipe(tiny_recipe("one", train={"steps": 2})))
    c = load_file(one.out_dir / "ckpt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model."))  # 4 passes differ


@pytest.mark.parametrize("train_section,message", [
    ({"batch_per_device": 5}, "train.batch_per_device=5 must divide the batch of each process"),
    ({"batch_per_device": 4, "micro_batches": 2}, "train.micro_batches=2 contradicts "
                                                  "train.batch_per_device=4")])
def test_bad_batch_per_device_is_one_message(tiny_recipe, capsys, train_section, message):
    path = tiny_recipe("bad", train=train_section)
    assert st("train", path) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (path.parent / "bad" / "ckpt.safetensors").exists()
