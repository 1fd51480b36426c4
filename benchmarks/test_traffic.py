"""The traffic model of the GPU-filling kernels at a real layer's shapes (benchmarks/traffic.py):
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


def test_each_backward_kernel_reads_its_big_inputs_once():
    # rows: dy read and dx written once; weights: x and dy read once for both sides (the old
    # weight launch read each twice). The pass as a whole reads dy twice (see BENCHMARKS.md).
    s = Shape(M=8192)
    big = s.M * s.d_in * s.eb
    rows = {r["launch"].split(" (")[0]: r for r in traffic(s)}
    assert rows["backward rows"]["hbm"] <= 1.1 * 2 * big
    assert rows["backward weights"]["hbm"] <= 1.15 * 2 * big
