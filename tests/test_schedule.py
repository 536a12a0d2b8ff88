import pytest
import torch

from ppsearch.schedule import PatchShape, Schedule, ScheduleError


@pytest.mark.parametrize("text", [
    "2x2", "4x4@0.5,2x2", "4x4@0.5,2x4@0.75,2x2", "4x4@0.5:cfg1.0,2x4@0.75:cfg1.5,2x2:cfg4.0",
    "8x8@0.1,4x4@0.3,4x2@0.6,2x2@0.9,1x1",
])
def test_text_round_trip(text):
    schedule = Schedule.parse(text)
    assert str(schedule) == text
    assert Schedule.parse(str(schedule)) == schedule
    assert Schedule.from_dict(schedule.to_dict()) == schedule


def test_parse_reads_stages():
    schedule = Schedule.parse(" 4x4@0.5:cfg1, 2x4@0.75 ,2x2 ")
    assert [str(s.patch) for s in schedule.stages] == ["4x4", "2x4", "2x2"]
    assert [(s.t_start, s.t_end) for s in schedule.stages] == [(0.0, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [s.guidance for s in schedule.stages] == [1.0, None, None]
    assert str(schedule) == "4x4@0.5:cfg1.0,2x4@0.75,2x2"
    assert schedule.patch_shapes == [PatchShape(4, 4), PatchShape(2, 4), PatchShape(2, 2)]


def test_yaml_round_trip(tmp_path):
    import yaml

    schedule = Schedule.parse("4x4@0.25:cfg1.5,2x2")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(schedule.to_dict()))
    assert Schedule.from_dict(yaml.safe_load(path.read_text())) == schedule


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("4x4@0.5", "last stage"),
    ("4x4,2x2", "needs @T_END"),
    ("4x4@0.75,2x4@0.5,2x2", "increase strictly"),
    ("4x4@0.5,2x4@0.5,2x2", "increase strictly"),
    ("4x4@0,2x2", "inside (0, 1)"),
    ("4x4@1.0,2x2", "inside (0, 1)"),
    ("4x4@-0.2,2x2", "inside (0, 1)"),
    ("2x2@0.5,4x4", "must not grow"),
    ("2x4@0.5,4x4", "must not grow"),
    ("4x4@0.5,2x2;1x1", "cannot read stage"),
    ("4y4", "cannot read stage"),
    ("4x4@abc,2x2", "bad boundary"),
    ("4x4@nan,2x2", "finite"),
    ("2x2:cfgx", "bad guidance"),
    ("2x2:cfg-1", "guidance scale"),
    ("0x2", "positive"),
])
def test_invalid_text(text, message):
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Schedule.parse(text)


def test_schedule_error_is_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_check_for_latent_and_base():
    schedule = Schedule.parse("8x8@0.5,2x2")
    schedule.check_for((32, 32), PatchShape(2, 2))
    with pytest.raises(ScheduleError, match="does not divide the 28x28 latent"):
        schedule.check_for((28, 28), PatchShape(2, 2))
    with pytest.raises(ScheduleError, match="cannot be initialised from the base patch 2x2"):
        Schedule.parse("3x3@0.5,2x2").check_for((12, 12), PatchShape(2, 2))
    with pytest.raises(ScheduleError, match="cannot be initialised"):
        Schedule.parse("2x2@0.5,1x1").check_for((8, 8), PatchShape(2, 2))


def test_stage_index_half_open():
    schedule = Schedule.parse("4x4@0.5,2x4@0.75,2x2")
    t = torch.tensor([0.0, 0.49, 0.5, 0.7499, 0.75, 0.999, 1.0])
    assert schedule.stage_index(t).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert schedule.stage_at(0.5).patch == PatchShape(2, 4)


def test_with_guidance_keeps_explicit_scales():
    schedule = Schedule.parse("4x4@0.5:cfg1.0,2x2").with_guidance(4.0)
    assert [s.guidance for s in schedule.stages] == [1.0, 4.0]


def test_bad_mapping():
    with pytest.raises(ScheduleError, match="bad schedule mapping"):
        Schedule.from_dict({"stage": []})
