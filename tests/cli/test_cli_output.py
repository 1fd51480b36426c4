"""No command loses data: the shared output helper (cli/output.py) on its own, then `cgc-lora
train` through it (a failed run leaves the old output whole; --overwrite leaves no stale files
and no checkpoints of two runs)."""

import json
import os
import stat

import pytest

from cgc_kernels.cli import main
from cgc_kernels.cli.output import staged_output
from cgc_kernels.data import demo_tasks
from cgc_kernels.data.reader import UserError, read_jsonl


def _leftovers(folder):
    """Staging siblings left in `folder` (hidden entries)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _old_run(path):
    path.mkdir()
    (path / "weights.bin").write_text("old weights")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "checkpoint-500").mkdir()
    return path


def test_new_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with staged_output(str(out), overwrite=False) as staging:
        (open(os.path.join(staging, "a.txt"), "w")).close()
        assert not out.exists()  # nothing at the final path while the command runs
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_run_leaves_the_old_output_whole(tmp_path, exc):
    out = _old_run(tmp_path / "out")
    with pytest.raises(type(exc)), staged_output(str(out), overwrite=True) as staging:
        with open(os.path.join(staging, "weights.bin"), "w") as f:
            f.write("half-written")
        raise exc
    assert (out / "weights.bin").read_text() == "old weights"
    assert (out / "checkpoints" / "checkpoint-500").is_dir() and _leftovers(tmp_path) == []


def test_failed_first_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged_output(str(tmp_path / "out"), overwrite=False) as staging:
        os.mkdir(os.path.join(staging, "checkpoints"))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_run_keeps_its_checkpoints_beside_the_output(tmp_path, exc, capsys):
    out = _old_run(tmp_path / "out")
    with pytest.raises(type(exc)), staged_output(str(out), overwrite=True, keep_on_failure="checkpoints") as staging:
        os.makedirs(os.path.join(staging, "checkpoints", "checkpoint-7"))
        with open(os.path.join(staging, "checkpoints", "checkpoint-7", "w.bin"), "w") as f:
            f.write("new weights")
        raise exc
    assert (out / "weights.bin").read_text() == "old weights"  # the old output untouched
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.interrupted-")]
    assert len(kept) == 1
    assert (kept[0] / "checkpoints" / "checkpoint-7" / "w.bin").read_text() == "new weights"
    assert str(kept[0] / "checkpoints") in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_overwrite_replaces_the_whole_output(tmp_path):
    out = _old_run(tmp_path / "out")
    with staged_output(str(out), overwrite=True) as staging:
        os.mkdir(os.path.join(staging, "checkpoints"))
        with open(os.path.join(staging, "checkpoints", "new.txt"), "w") as f:
            f.write("new")
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "new.txt"]  # no old file survives
    assert _leftovers(tmp_path) == []


def test_refusals(tmp_path):
    out = _old_run(tmp_path / "out")
    with pytest.raises(UserError, match="already exists .*pass --overwrite"):
        with staged_output(str(out), overwrite=False):
            pytest.fail("must not start")
    (tmp_path / "empty").mkdir()
    with staged_output(str(tmp_path / "empty"), overwrite=False) as staging:  # an empty folder is no data
        (open(os.path.join(staging, "x"), "w")).close()
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    with pytest.raises(UserError, match="is the input"):
        with staged_output(str(data), overwrite=True, inputs=[str(data)], kind="file"):
            pass
    with pytest.raises(UserError, match="lies inside the input"):
        with staged_output(str(out / "export"), overwrite=True, inputs=[str(out)]):
            pass
    with pytest.raises(UserError, match="holds the input"):
        with staged_output(str(out), overwrite=True, inputs=[str(out / "checkpoints" / "checkpoint-500")]):
            pass
    with pytest.raises(UserError, match="current directory"):
        with staged_output(os.getcwd(), overwrite=True):
            pass
    assert (out / "weights.bin").read_text() == "old weights"


def test_file_output_and_modes(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("old\n")
    with pytest.raises(UserError, match="already exists"):
        with staged_output(str(path), overwrite=False, kind="file"):
            pass
    with staged_output(str(path), overwrite=True, kind="file") as tmp:
        with open(tmp, "w") as f:
            f.write("new\n")
    assert path.read_text() == "new\n" and _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the temp file's private 0600
    with staged_output(str(tmp_path / "dir"), overwrite=False) as staging:
        fd = os.open(os.path.join(staging, "w.bin"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "dir" / "w.bin").stat().st_mode) == 0o666 & ~umask


# ---- through `cgc-lora train` ------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = read_jsonl(os.path.join(demo_tasks.data_dir(), demo_tasks.FILES[0]))[::40]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(data, out, steps, *extra):
    return main(["train", "--tiny", "--data", data, "--out", str(out), "--steps", str(steps), "--batch-size", "4",
                 "--save-steps", "1", "--rank", "2", "--warmup-steps", "0", "--target-modules", "q_proj", *extra])


def test_train_overwrite_keeps_no_stale_files_or_old_checkpoints(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    assert _train(data, out, 3) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    (out / "gates.png").write_text("stale")
    before = (out / "cgc_adapter.safetensors").read_bytes()
    assert _train(data, out, 1) == 2  # refused: the first run is still there, untouched
    assert (out / "cgc_adapter.safetensors").read_bytes() == before

    # A run that fails after training (here: while saving) leaves the old run whole, no checkpoints
    # of its own anywhere, and no staging folder.
    from cgc_kernels.cli import train as train_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(train_module, "save_trained", fail)
        assert _train(data, out, 1, "--overwrite") == 2
    assert (out / "cgc_adapter.safetensors").read_bytes() == before and (out / "gates.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert _leftovers(tmp_path) == []

    assert _train(data, out, 1, "--overwrite") == 0
    assert not (out / "gates.png").exists()  # replaced as a whole
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # this run's only
    assert (out / "cgc_adapter.safetensors").read_bytes() != before
