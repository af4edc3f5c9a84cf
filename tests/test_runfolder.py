"""Run folders (identity, lock, records) and settings schemas: the core every app's resume stands on."""

import json
import multiprocessing

import pytest

from taylorseer.harness import runfolder, settings
from taylorseer.harness.runfolder import Records, RunFolder, RunFolderError
from taylorseer.harness.settings import Setting, SettingsError

CONFIG = {"out_root": "runs", "progress": True, "batch_size": 8, "seed": 0, "num_steps": 50, "device": "auto",
          "cache": {"interval": 6, "max_order": 1, "offload": False}, "prompt_file": "a.txt"}


def test_identity_is_the_config_minus_what_cannot_change_an_output():
    ident = runfolder.identity(CONFIG, {"resolved.device": "cpu"})
    assert ident == {"cache.interval": 6, "cache.max_order": 1, "num_steps": 50, "resolved.device": "cpu",
                     "seed": 0}
    # A setting added later is in the identity unless it is denied: forgetting costs a refusal, never a mix.
    assert "new_knob" in runfolder.identity({**CONFIG, "new_knob": 1})
    assert "grid_nrow" not in runfolder.identity({**CONFIG, "grid_nrow": 4}, ignore=("grid_nrow",))


def test_a_folder_with_outputs_of_other_settings_is_refused_in_one_line(tmp_path):
    ident = runfolder.identity(CONFIG)
    with RunFolder.open(tmp_path, ident):
        (tmp_path / "00000.png").write_bytes(b"x")
    with RunFolder.open(tmp_path, ident):  # same settings: resumes
        pass
    other = runfolder.identity({**CONFIG, "num_steps": 28, "cache": {**CONFIG["cache"], "interval": 5}})
    with pytest.raises(RunFolderError) as info:
        RunFolder.open(tmp_path, other)
    message = str(info.value)
    assert "\n" not in message and "cache.interval: 6 -> 5; num_steps: 50 -> 28" in message
    assert "run_name=<new name>" in message
    # Settings that cannot change an output do not block a resume.
    with RunFolder.open(tmp_path, runfolder.identity({**CONFIG, "batch_size": 1, "progress": False})):
        pass


def test_a_folder_without_outputs_never_blocks(tmp_path):
    # A run that failed before its first output (wrong weights, say) leaves run.json; the corrected run goes on.
    with RunFolder.open(tmp_path, {"a": 1}):
        pass
    with RunFolder.open(tmp_path, {"a": 2}):
        pass
    assert json.loads((tmp_path / "run.json").read_text()) == {"identity": {"a": 2}}


def test_outputs_without_a_record_of_their_settings_are_refused(tmp_path):
    (tmp_path / "0000-class1.png").write_bytes(b"old")
    with pytest.raises(RunFolderError, match="holds outputs but no run.json"):
        RunFolder.open(tmp_path, {"a": 1})


def _try_open(path, queue):
    try:
        RunFolder.open(path, {"a": 1})
        queue.put("opened")
    except RunFolderError as err:
        queue.put(str(err))


def test_one_run_at_a_time_per_folder(tmp_path):
    with RunFolder.open(tmp_path, {"a": 1}):
        queue = multiprocessing.get_context("fork").Queue()
        proc = multiprocessing.get_context("fork").Process(target=_try_open, args=(tmp_path, queue))
        proc.start()
        proc.join(30)
        message = queue.get(timeout=5)
        assert message.startswith("another run (pid ") and f"is writing into {tmp_path} right now" in message
    # Released when the first run closes (or dies: the kernel drops a dead process's flock).
    with RunFolder.open(tmp_path, {"a": 1}):
        pass


def _png(path, value=0):
    from PIL import Image

    Image.new("L", (8, 8), value).save(path)


def test_records_merge_writers_skip_torn_lines_and_require_their_files(tmp_path):
    a, b = Records(tmp_path, "rank0"), Records(tmp_path, "rank1")
    for i, rec in enumerate((a, b, a)):
        _png(tmp_path / f"{i}.png", i)
        rec.append({"index": i, "file": f"{i}.png", "latency_s": 0.1})
    with open(tmp_path / "records" / "rank1.jsonl", "a") as f:
        f.write('{"index": 7, "file": "7.p')  # a writer killed mid-line
    (tmp_path / "2.png").unlink()  # an output deleted after its record
    assert sorted(a.load()) == [0, 1, 2]
    assert sorted(a.done(lambda r: [r["file"]])) == [0, 1]


def test_fingerprints_follow_content_not_names(tmp_path):
    one, two = tmp_path / "a.pt", tmp_path / "b.pt"
    one.write_bytes(b"\x00" * 3_000_000)
    two.write_bytes(b"\x00" * 3_000_000)
    assert runfolder.file_fingerprint(one) == runfolder.file_fingerprint(two)
    data = bytearray(two.read_bytes())
    data[-10] = 1  # a torch zip's central directory (CRCs of every tensor) sits at the end
    two.write_bytes(bytes(data))
    assert runfolder.file_fingerprint(one) != runfolder.file_fingerprint(two)
    folder = tmp_path / "pipe"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 100)
    before = runfolder.folder_fingerprint(folder)
    (folder / "model_index.json").write_text('{"_class_name": "FluxKontextPipeline"}')
    assert runfolder.folder_fingerprint(folder) != before
    assert runfolder.digest(["a cat", "a dog"]) != runfolder.digest(["a dog", "a cat"])


def test_weights_known_by_a_hub_id_only_are_not_pinned_by_content(tmp_path, monkeypatch):
    from taylorseer.harness.diffusers_io import content_fingerprint, weights_fingerprint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    local = weights_fingerprint(str(folder))
    assert content_fingerprint(local) == local == runfolder.folder_fingerprint(folder)
    hub = weights_fingerprint("nobody/not-downloaded-here")  # no snapshot on disk: only the id is known
    assert hub == "hub:nobody/not-downloaded-here" and content_fingerprint(hub) is None
    assert content_fingerprint(None) is None


SCHEMA = {"num_steps": Setting("int", minimum=1), "compare": Setting("bool"), "scale": Setting("float", minimum=0.0),
          "mode": Setting("str", choices=("a", "b")), "model.path": Setting("str"),
          "maybe": Setting("int", nullable=True)}
GOOD = {"out_root": "runs", "device": "auto", "dtype": "auto", "seed": 0, "progress": True, "run_name": None,
        "num_steps": 50, "compare": False, "scale": 1, "mode": "a", "model": {"path": "x"}, "maybe": None,
        "cache": {"anything": 1}}


@pytest.mark.parametrize("change,message", [
    ({"num_steps": "abc"}, "num_steps='abc' is invalid: expected an integer >= 1"),
    ({"num_steps": 2.5}, "num_steps=2.5 is invalid: expected an integer >= 1"),
    ({"num_steps": True}, "num_steps=True is invalid"),
    ({"compare": "no"}, "compare='no' is invalid: expected true or false"),
    ({"scale": float("nan")}, "scale=nan is invalid"),
    ({"mode": "c"}, "mode='c' is invalid: expected one of ['a', 'b']"),
    ({"seed": -1}, "seed=-1 is invalid: expected an integer >= 0"),
    ({"nope": 1}, "unknown setting(s) ['nope']"),
    ({"model": {"path": "x", "pth": "y"}}, "unknown setting(s) ['model.pth']"),
])
def test_settings_fail_in_one_line_naming_the_key(change, message):
    settings.check(GOOD, SCHEMA, "app")
    with pytest.raises(SettingsError) as info:
        settings.check({**GOOD, **change}, SCHEMA, "app")
    assert message in str(info.value) and "\n" not in str(info.value)
