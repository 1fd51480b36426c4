"""The traffic model of the kernels `cgc_lora` launches on a GPU, at a real layer's shapes (benchmarks/traffic.py):
the bytes each pass moves from HBM, counted from the kernels' loops, against the floor."""

from benchmarks.traffic import Shape, step_ratio, traffic


def _pass_ratio(s: Shape, which: str) -> float:
    rows = [r for r in traffic(s) if r["pass_"] == which]
    return sum(r["hbm"] for r in rows) / rows[0]["floor"]


def test_decode_forward_moves_about_the_floor():
    # M = 16, one token per task: the experts' weights dominate; each is read from HBM once.
    assert _pass_ratio(Shape(M=16), "forward") <= 1.3


def test_training_step_within_1_3x_of_the_floor():
    s = Shape(M=8192)
    assert _pass_ratio(s, "forward") <= 1.3
    assert step_ratio(s) <= 1.3


def test_training_backward_within_1_3x_of_the_floor():
    # dy read once (dB and dz partials), x once (dA), dx written once; partials are small.
    assert _pass_ratio(Shape(M=8192), "backward") <= 1.3


def test_each_backward_launch_reads_its_big_input_once():
    s = Shape(M=8192)
    big = s.M * s.d_in * s.eb
    rows = {r["launch"].split(" (")[0]: r for r in traffic(s)}
    assert rows["backward dB + dz parts"]["hbm"] <= 1.35 * big  # dy, plus dB partials and dz parts
    assert rows["backward rows"]["hbm"] <= 1.25 * big  # dx, plus the dz parts
    assert rows["backward dA"]["hbm"] <= 1.25 * big  # x, plus dA partials
