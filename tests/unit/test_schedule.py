import pytest

from superblock.sparsity.schedule import SparsitySchedule


def test_constant():
    s = SparsitySchedule(final=0.9)
    assert [s.value(t) for t in (0, 10, 10**6)] == [0.9, 0.9, 0.9]


def test_linear_values():
    s = SparsitySchedule(final=0.8, kind="linear", initial=0.0, start_step=10, ramp_steps=100)
    assert s.value(0) == 0.0 and s.value(10) == 0.0
    assert s.value(60) == pytest.approx(0.4)
    assert s.value(110) == pytest.approx(0.8) and s.value(10**6) == pytest.approx(0.8)


def test_cubic_values_zhu_gupta():
    s = SparsitySchedule(final=0.9, kind="cubic", initial=0.5, ramp_steps=100)
    assert s.value(0) == pytest.approx(0.5)
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3
    assert s.value(50) == pytest.approx(0.9 + (0.5 - 0.9) * 0.5**3)
    assert s.value(25) == pytest.approx(0.9 - 0.4 * 0.75**3)
    assert s.value(100) == pytest.approx(0.9)
    # cubic prunes faster than linear early on
    lin = SparsitySchedule(final=0.9, kind="linear", initial=0.5, ramp_steps=100)
    assert s.value(20) > lin.value(20)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"final": 1.0}, r"\[0, 1\)"),
        ({"final": -0.1}, r"\[0, 1\)"),
        ({"final": 0.5, "kind": "exp"}, "unknown sparsity schedule"),
        ({"final": 0.5, "kind": "linear"}, "ramp_steps"),
        ({"final": 0.5, "kind": "linear", "ramp_steps": 10, "initial": 1.5}, "initial sparsity"),
        ({"final": 0.5, "start_step": -1}, ">= 0"),
    ],
)
def test_bad_schedules(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SparsitySchedule(**kwargs)


def test_a_run_of_one_step_still_has_a_ramp_to_take():
    """trainer.max_steps=1 with the default cubic ramp over half the run: a ramp of one step, not an error."""
    from superblock.config import SparsityConfig
    from superblock.engine.builders import sparsity_spec
    from superblock.sparsity.schedule import SparsitySchedule

    spec = sparsity_spec(SparsityConfig(schedule="cubic", ramp_fraction=0.5), steps_per_epoch=8, total_steps=1)
    assert spec["ramp_steps"] == 1
    SparsitySchedule(final=0.8, kind="cubic", ramp_steps=spec["ramp_steps"])  # accepted
    constant = sparsity_spec(SparsityConfig(schedule="constant", ramp_fraction=None), steps_per_epoch=8, total_steps=1)
    assert constant["ramp_steps"] == 0
