"""collect-demos / demos-info: dataset round trip and errors on fake episodes (no simulator), then a
real small collection through the CLI that is killed with SIGKILL and resumed (marked sim)."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
import torch

from conftest import fake_episode, fake_metadata
from data_collection.collect import episode_seed
from data_collection.dataset import (
    DatasetError,
    DemoDataset,
    remove_partial_shards,
    shard_cells,
    write_metadata,
    write_shard,
)
from vla_razor.action_tokens import make_action_tokenizer
from vla_razor.cli import demos_info
from vla_razor.cli.collect_demos import check_same_dataset

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture
def fake_dataset(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "demos"
    write_metadata(root, fake_metadata())
    episodes = {cell: [fake_episode(cell, a, length=3 + cell + a) for a in range(2)] for cell in (0, 2)}
    for cell, eps in episodes.items():
        write_shard(root, cell, eps, attempts=3)
    return root, episodes


def test_shards_round_trip_every_step_field_and_episode_scalar(fake_dataset):
    root, episodes = fake_dataset
    data = DemoDataset(root)
    assert data.cells == [0, 2]
    assert data.episode_keys() == [(c, episode_seed(0, c, a)) for c in (0, 2) for a in range(2)]
    read = list(data.episodes())
    expected = [ep for c in (0, 2) for ep in episodes[c]]
    assert len(read) == len(expected)
    for (row, steps), ep in zip(read, expected):
        assert (row["cell"], row["seed"], row["attempt"], row["success"], row["length"]) == \
            (ep.cell, ep.seed, ep.attempt, True, ep.length)
        assert row["x"] == pytest.approx(ep.x) and row["y"] == pytest.approx(ep.y)
        assert steps.batch_size == (ep.length,)
        assert torch.equal(steps["observation", "image"], ep.images)
        assert torch.equal(steps["observation", "state"], ep.states)
        assert torch.equal(steps["action"], ep.actions)
        assert torch.equal(steps["vla_action", "tokens"], ep.tokens)
        assert steps["step"].tolist() == list(range(ep.length))
    summary = data.summary()
    assert (summary["episodes"], summary["attempts"], summary["cells_done"], summary["complete"]) == (4, 6, 2, False)
    assert summary["steps"] == sum(ep.length for ep in expected)
    assert summary["step_fields"]["observation.image"] == ("uint8", [8, 8, 3])


def test_a_dataset_reads_through_a_relative_path_and_a_link(fake_dataset, tmp_path, monkeypatch):
    """The main job's default RUN_ROOT is relative (runs/main), and users link dataset folders around; the shards'
    truncation check must find their files either way."""
    root, _ = fake_dataset
    (tmp_path / "linked").symlink_to(root)
    monkeypatch.chdir(tmp_path)
    for folder in (Path("demos"), Path("linked"), tmp_path / "linked"):
        data = DemoDataset(folder)
        assert data.summary()["episodes"] == 4 and len(list(data.episodes())) == 4


def test_a_shard_is_written_once_and_temporary_folders_are_not_shards(fake_dataset):
    root, episodes = fake_dataset
    with pytest.raises(FileExistsError):
        write_shard(root, 0, episodes[0], attempts=2)
    # What a kill -9 during a shard write leaves behind: a hidden temporary folder.
    partial = root / "shards" / ".tmp-cell_0001-12345"
    partial.mkdir()
    (partial / "action.memmap").write_bytes(b"\0" * 10)
    assert shard_cells(root) == [0, 2]
    assert remove_partial_shards(root) == 1 and not partial.exists()


def test_a_cell_where_every_attempt_failed_is_an_empty_shard(fake_dataset):
    root, _ = fake_dataset
    write_shard(root, 1, [], attempts=10)
    data = DemoDataset(root)
    assert data.cells == [0, 1, 2] and data.shard(1)["episodes"].batch_size == (0,)
    summary = data.summary()
    assert (summary["episodes"], summary["attempts"], summary["min_per_cell"]) == (4, 16, 0)


def test_foreign_and_missing_folders_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        DemoDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="metadata.json not found"):
        DemoDataset(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "lerobot", "version": 2}))
    with pytest.raises(DatasetError, match="format 'lerobot', expected 'vla-razor-demos'"):
        DemoDataset(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        DemoDataset(tmp_path)


def test_corrupt_shard_error_names_the_shard_and_the_fix(fake_dataset):
    root, _ = fake_dataset
    image_file = root / "shards" / "cell_0002" / "steps" / "observation" / "image.memmap"
    image_file.write_bytes(image_file.read_bytes()[:100])  # truncated by a crash outside our atomic write
    data = DemoDataset(root)
    with pytest.raises(DatasetError, match="cell_0002 is corrupt.*delete that folder and rerun collect-demos"):
        data.summary()
    (root / "shards" / "cell_0000" / "meta.json").unlink()
    with pytest.raises(DatasetError, match="cell_0000 is corrupt"):
        data.shard(0)


def test_demos_info_prints_counts_and_rejects_foreign_folders(fake_dataset, tmp_path, capsys):
    root, _ = fake_dataset
    assert demos_info.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "2/4 cells collected (incomplete" in out and "4 kept of 6 attempts" in out
    assert "vla_action.tokens      int64    [T, 7]" in out
    assert demos_info.main([str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 4
    assert demos_info.main([str(tmp_path / "empty")]) == 2
    assert "not exist" in capsys.readouterr().err


def test_resume_refuses_a_folder_collected_with_other_settings(tmp_path):
    existing = {**fake_metadata(per_cell=2), "format": "vla-razor-demos"}
    check_same_dataset(tmp_path, existing, fake_metadata(per_cell=2))
    with pytest.raises(DatasetError, match="per_cell: folder has 2, this run asks 5"):
        check_same_dataset(tmp_path, existing, fake_metadata(per_cell=5))


def test_episode_seeds_are_unique_per_cell_and_attempt():
    seeds = {episode_seed(s, c, a) for s in range(2) for c in range(100) for a in range(30)}
    assert len(seeds) == 2 * 100 * 30
    with pytest.raises(ValueError):
        episode_seed(0, 0, 10_000)


def test_console_scripts_point_at_importable_functions():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("collect-demos", "demos-info"):
        module, func = scripts[name].split(":")
        assert callable(getattr(import_module(module), func))


def cli(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vla_razor.cli.collect_demos", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kwargs)


def test_cli_rejects_unknown_task_and_misspelt_fields(tmp_path):
    bad_task = cli("env=pick_cube", f"out_dir={tmp_path}/a")
    known = "known: ['close_drawer', 'open_drawer', 'pick_can', 'simpler_pick_coke_can'"
    assert bad_task.returncode != 0 and known in bad_task.stderr
    assert bad_task.stderr.startswith("collect-demos: error: env='pick_cube'") and "Traceback" not in bad_task.stderr
    typo = cli("per_cel=3", f"out_dir={tmp_path}/b")
    assert typo.returncode != 0 and "per_cel" in typo.stdout + typo.stderr


def test_cli_refuses_a_non_empty_foreign_out_dir(tmp_path):
    pytest.importorskip("mani_skill", reason="placement_box imports mani_skill")
    (tmp_path / "notes.txt").write_text("mine")
    result = cli(f"out_dir={tmp_path}", "grid=1", "per_cell=1")
    assert result.returncode != 0 and "not a vla-razor demos dataset" in result.stderr
    assert result.stderr.startswith("collect-demos: error:") and "Traceback" not in result.stderr


def test_cli_without_a_vulkan_device_says_how_to_get_one_in_one_line(tmp_path):
    pytest.importorskip("mani_skill", reason="placement_box imports mani_skill")
    # a Vulkan loader pointed at a driver list that does not exist finds no device
    no_vulkan = {**os.environ, "VK_ICD_FILENAMES": str(tmp_path / "none.json"),
                 "VK_DRIVER_FILES": str(tmp_path / "none.json")}
    result = cli(f"out_dir={tmp_path}/demos", "grid=1", "per_cell=1", env=no_vulkan)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("collect-demos: error: no usable Vulkan device for SAPIEN")
    assert "scripts/setup_vulkan.sh" in result.stderr
    assert not (tmp_path / "demos" / "shards").exists()


# --- the real simulator ------------------------------------------------------------------------------------------


@pytest.mark.sim
def test_killed_collection_resumes_to_exactly_the_expected_episodes_with_video(sim, tmp_path):
    """SIGKILL a 2x2 x 2 collection once its first shard lands, rerun: every (cell, seed) exactly once, and
    byte-identical to an uninterrupted collection."""
    out = tmp_path / "demos"
    args = ["env=pick_can", "expert=scripted", "grid=2", "per_cell=2", f"out_dir={out}", "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "vla_razor.cli.collect_demos", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "shards" / "cell_0000").exists():
            assert proc.poll() is None, "collection exited before writing its first shard"
            assert time.time() < deadline, "no shard after 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    interrupted = shard_cells(out)
    assert 1 <= len(interrupted) < 4, f"the kill came too late to test a resume: cells {interrupted}"

    result = cli(*args, "video=true", "video_episodes=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(interrupted)}/4 cells already collected" in result.stdout + result.stderr
    data = DemoDataset(out)
    keys = data.episode_keys()
    # The scripted pick-can expert succeeds on this grid every time, so the kept attempts are 0 and 1.
    assert keys == [(c, episode_seed(0, c, a)) for c in range(4) for a in range(2)]
    meta = data.metadata
    assert meta["complete"] and meta["per_cell_counts"] == {str(c): 2 for c in range(4)}
    assert meta["instruction"] == "pick coke can" and meta["tokenizer"]["num_bins"] == 256

    tokenizer = make_action_tokenizer()
    lengths = []
    for row, steps in data.episodes():
        assert row["success"] and 10 < row["length"] < 40
        assert steps["observation", "image"].shape == (row["length"], 128, 128, 3)
        assert steps["observation", "image"].float().std() > 10, "blank frames"
        assert steps["observation", "state"].shape == (row["length"], 19)
        assert torch.equal(steps["vla_action", "tokens"], tokenizer.encode(steps["action"].clone()).long())
        assert steps["observation", "state"][0, -3:-1].tolist() == pytest.approx([row["x"], row["y"]], abs=1e-3)
        lengths.append(row["length"])

    import imageio.v2 as imageio

    videos = sorted((out / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == [f"cell_0000_seed_{episode_seed(0, 0, 0)}.mp4"]
    frames = [frame for frame in imageio.get_reader(videos[0])]  # list() asks len(), which is inf for ffmpeg
    assert len(frames) == lengths[0] and frames[0].shape == (128, 128, 3)

    info = subprocess.run([sys.executable, "-m", "vla_razor.cli.demos_info", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "4/4 cells collected" in info.stdout and "8 kept of 8 attempts" in info.stdout

    again = cli(*args)  # nothing left to do: no new episodes, no duplicates
    assert again.returncode == 0 and "4/4 cells already collected, 0 to go" in again.stdout + again.stderr
    assert DemoDataset(out).episode_keys() == keys

    # An uninterrupted run writes the very same bytes -- a resume neither loses nor changes an episode -- and so
    # does one split over two worker processes (each cell's episodes depend on its seeds alone).
    reference = cli(*[a for a in args if not a.startswith("out_dir=")], f"out_dir={tmp_path / 'reference'}",
                    "num_workers=2")
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = DemoDataset(tmp_path / "reference")
    for cell in range(4):
        assert (ref.shard(cell) == data.shard(cell)).all(), f"cell {cell} differs from an uninterrupted run"
